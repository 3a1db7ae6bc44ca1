"""Attack and benign clients that hit a running deployment over HTTP (issue 5).

* :mod:`._http`: the attacker's view of a deployment (OIP v2 JSON, ``x-api-key``,
  rows counted, statuses and request ids recorded);
* :mod:`._data`: the victim (the demo's digits model), the natural rows and the
  open-world attacker's photo patches;
* :mod:`.extraction`: JbDA, Knockoff (uniform, natural from the victim's own
  distribution, open world from photo patches), equation solving;
* :mod:`.evasion`: ART's HopSkipJump and Boundary attacks (ART imported lazily);
* :mod:`.benign`: benign clients replaying natural held-out rows;
* :mod:`.clients`: one entry point per client by name (``guard simulate``);
* ``run.py``: the benchmark (``python benchmarks/attacks/run.py [--quick]``).

Only numpy, scikit-learn and the standard library are needed, plus
adversarial-robustness-toolbox for the two evasion clients and Pillow (to load
scikit-learn's sample photos) for the open-world Knockoff client. ``guard simulate``
loads this package from the source checkout by path, so it uses relative
imports only.
"""
