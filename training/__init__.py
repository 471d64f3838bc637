"""Training the trained demo model (issue 18): the project's own speech frontend and LLM, LoRA, the InfiniSST objective.

Outside the ``infinisst_backend`` package, which never imports it. ``python -m training.train`` trains and resumes,
``python -m training.export`` writes the shipped file that ``python -m infinisst_backend.model.demo --trained``
builds the demo checkpoint from. The data pipeline (speech synthesis, turn targets) is ``training.data``.
"""
