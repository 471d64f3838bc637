"""Server-side tools around the ``infinisst`` Triton model (the client itself is :mod:`client`):

- :mod:`server_tools.tritonserver`: tritonserver as a child process (free ports, readiness, metrics, clean stop);
- :mod:`server_tools.gen_gpu_repo`: ``python -m server_tools.gen_gpu_repo`` writes a GPU model repository from
  ``model_repository/infinisst/config.pbtxt`` (:mod:`server_tools.model_config` reads and rewrites it);
- :mod:`server_tools.soak`: ``python -m server_tools.soak``, the soak test of a running server;
- :mod:`server_tools.metrics`: the server's Prometheus metrics; :mod:`server_tools.processes`: its processes.
"""
