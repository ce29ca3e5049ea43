"""UNTESTED HERE (no Kubernetes on this project's machines): every step of a run as its own
Kubernetes Job, for datasets too big for one pod. Not imported by the package; to use it, make
your image's code location this module instead of kura_pipeline.definitions:

    dagsterApiGrpcArgs: ["-f", "/opt/kura/deploy/k8s/k8s_job_executor.py"]

Needs `dagster-k8s` (the 0.x release of your dagster version) in the image. KURA_DATA_DIR must
be object storage: steps run in different pods and share nothing else. The "llm" pool still
limits how many LLM stages run at once across all pods (it lives in the instance's Postgres).
Per-step settings (image, env from the ConfigMap/Secret, resources) go in run config:

    execution:
      config:
        max_concurrent: 4
        env_config_maps: [kura-env]
        env_secrets: [kura-secrets]
"""

from dagster import Definitions
from dagster_k8s import k8s_job_executor

from kura_pipeline.definitions import defs as local_defs

defs = Definitions.merge(local_defs, Definitions(executor=k8s_job_executor))
