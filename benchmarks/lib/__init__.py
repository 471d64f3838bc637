"""What the benchmark scripts share.

- :mod:`.models`: the paper-dimension dummy model (random weights) and a synthetic Llama-3.1 tokenizer;
- :mod:`.real_llm`: SmolLM2-135M-Instruct's real weights in an InfiniSST model (``gpu_parity --llm real``);
- :mod:`.gpu`: device facts for reports, synchronization and timing;
- :mod:`.clock`: the virtual clock that simulates real time around a stepped engine;
- :mod:`.static_scheduler`: the static batching baseline (benchmark only);
- :mod:`.trials`: one trial of N real-time streams on an engine (``gpu_streams``); :mod:`.sweep`: the search for N*;
- :mod:`.parts`: decode / prefill / encoder costs and the naive baseline; :mod:`.report`: the ``gpu_streams``
  report (markdown, JSON, plot), ``--merge`` and ``--combine``;
- :mod:`.parity` and :mod:`.parity_report`: the FlashInfer-vs-torch checks of ``gpu_parity``;
- :mod:`.kernel_profile`: CUDA kernels of a step by name and kind (``profile_llm``, ``profile_encoder``).

Percentiles come from :func:`client.stats.percentiles` (numpy's).
"""
