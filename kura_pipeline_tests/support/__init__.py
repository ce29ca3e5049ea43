"""What the tests and benchmarks run beside the pipeline, never part of the installed package.

- ``loopback``: an OpenAI-compatible server on 127.0.0.1 for the fault drills and benchmarks
  (schema-aware answers, scripted replies, faults, request accounting); needs uvicorn and
  starlette from the ``test`` extra. ``python -m kura_pipeline_tests.support.loopback --help``.
- ``schema_instance``: the JSON instance the loopback server answers a structured request with.
"""
