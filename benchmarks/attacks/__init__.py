"""Attack, benign and hard-case clients that hit a deployment through its API (issues 5, 10).

* :mod:`._data`: the victims: a registry of deployments (scikit-learn's bundled
  digits, wine and breast cancer data, each with a linear and an MLP model)
  plus the ``guard demo`` digits model, their held-out rows, and the open-world
  attacker's photo patches;
* :mod:`._http`: the attacker's view of a deployment (OIP v2 JSON, ``x-api-key``,
  rows counted, statuses and request ids recorded), over HTTP or in-process;
* :mod:`._asgi`: calling an ASGI app in-process on a simulated clock;
* :mod:`._traffic`: timed client sessions interleaved through one guard, and
  what the guard did to each client (from its audit log);
* :mod:`.extraction`: JbDA, Knockoff (uniform, natural from the victim's own
  distribution, open world from photo patches), equation solving;
* :mod:`.evasion`: ART's HopSkipJump, Boundary and SignOPT (ART imported lazily);
* :mod:`.benign`: benign clients replaying natural held-out rows;
* :mod:`.hardcases`: benign clients that look unusual (health probe, retrier,
  batch job, one-class client, what-if sweep, looping monitor, framing);
* :mod:`.clients`: one entry point per client by name (``guard simulate``);
* ``run.py``: the benchmark (``python benchmarks/attacks/run.py [--quick]``), with
  :mod:`._recipe` (the config recipe, fresh guards), :mod:`._results` and :mod:`._report`.

Only numpy, scikit-learn and the standard library are needed, plus
adversarial-robustness-toolbox for the evasion clients and Pillow (to load
scikit-learn's sample photos) for the open-world Knockoff client. ``guard
simulate`` loads this package from the source checkout by path, so it uses
relative imports only.
"""
