"""The Triton layer's pure-Python parts, one module each: ``parameters`` (config.pbtxt parameters), ``requests``
(request parsing, the stream registry), ``responses`` (error codes, response ordering), ``metrics``.

``model_repository/infinisst/1/model.py`` wires these to Triton's Python backend and to the engine. Nothing here
imports ``triton_python_backend_utils``: functions that build Triton objects take the module as an argument (``pb``),
so every piece runs and is tested with a fake.

Threads (see model.py): Triton's thread calls ``execute()``, which parses requests, resolves the stream and calls the
engine; the engine thread reports events through a queue; one response thread feeds the queue's items to a
:class:`~.responses.ResponseBook` and sends what it releases, in order.
"""
