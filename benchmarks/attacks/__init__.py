"""Attack and benign clients that hit a running deployment over HTTP (issue 5).

* :mod:`._http`: the attacker's view of a deployment (OIP v2 JSON, ``x-api-key``,
  rows counted, statuses and request ids recorded);
* :mod:`._data`: the victim (the demo's digits model) and the natural rows;
* :mod:`.extraction`: JbDA, Knockoff (uniform, natural), equation solving;
* :mod:`.evasion`: ART's HopSkipJump and Boundary attacks (ART imported lazily);
* :mod:`.benign`: benign clients replaying natural held-out rows;
* :mod:`.clients`: one entry point per client by name (``guard simulate``);
* ``run.py``: the benchmark (``python benchmarks/attacks/run.py [--quick]``).

Only numpy, scikit-learn and the standard library are needed, plus
adversarial-robustness-toolbox for the two evasion clients. ``guard simulate``
loads this package from the source checkout by path, so it uses relative
imports only.
"""
