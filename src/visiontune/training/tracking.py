"""MLflow tracking of a training run: on when ``MLFLOW_TRACKING_URI`` names a store this
environment can use, and never the reason a run fails.

Azure ML sets ``MLFLOW_TRACKING_URI=azureml://...`` in every job, which needs the
``azureml-mlflow`` plugin. Without the plugin, or with a tracking server that does not answer,
the run trains on: one note or warning line says tracking is off, and why.
"""

from __future__ import annotations

import logging
import os
import re
from urllib.parse import urlsplit

from transformers.integrations.integration_utils import MLflowCallback

from visiontune.console import AZURE_LIBRARIES, silenced

log = logging.getLogger("visiontune.training")

ENV_URI = "MLFLOW_TRACKING_URI"
_CREDENTIALS = re.compile(r"//[^/\s@]+@")  # user:password@ in a URL
# A tracking server that does not answer must not hold training up for MLflow's default
# minutes of retries; a user's own settings of these win.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def shown_uri(uri: str) -> str:
    """The URI without credentials, path or query (they may hold tokens)."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return f"{parts.scheme}://{host}" if parts.scheme else "a local folder"


def plan_tracking() -> tuple[bool, str | None]:
    """Whether to track this run in MLflow, and a note for the run's log (None: nothing to say)."""
    uri = os.environ.get(ENV_URI, "").strip()
    if not uri:
        return False, None
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    try:
        _tracking_store_registry.get_store_builder(uri)
    except Exception:  # noqa: BLE001 - MLflow raises several types for an unknown scheme
        scheme = urlsplit(uri).scheme
        plugin = " (pip install azureml-mlflow)" if scheme == "azureml" else ""
        return False, (f"MLflow tracking is off: {ENV_URI} is a {scheme}:// URI, which needs an MLflow "
                       f"plugin that is not installed{plugin}; the run's metrics are in metrics.jsonl")
    if urlsplit(uri).scheme in ("http", "https"):
        for name, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
    return True, f"metrics go to MLflow tracking at {shown_uri(uri)}"


def tracking_callback():
    """The Trainer's MLflow callback, made unable to fail the run."""
    class GuardedMLflowCallback(MLflowCallback):
        """Each hook of transformers' MLflow callback; the first error turns tracking off with
        one warning, and training goes on."""

        _off = False

        def _guard(self, hook, *args, **kwargs):
            if self._off:
                return None
            try:
                with silenced(AZURE_LIBRARIES):
                    return hook(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any tracking failure, by design
                self._off = True
                text = _CREDENTIALS.sub("//", str(exc).strip()) or type(exc).__name__
                log.warning("MLflow tracking failed (%s: %s); training goes on without it, its "
                            "metrics are in metrics.jsonl", type(exc).__name__, text.splitlines()[0][:200])
                return None

        def setup(self, args, state, model):
            return self._guard(super().setup, args, state, model)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            return self._guard(super().on_train_begin, args, state, control, model=model, **kwargs)

        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            return self._guard(super().on_log, args, state, control, logs=logs, model=model, **kwargs)

        def on_save(self, args, state, control, **kwargs):
            return self._guard(super().on_save, args, state, control, **kwargs)

        def on_train_end(self, args, state, control, **kwargs):
            return self._guard(super().on_train_end, args, state, control, **kwargs)

    return GuardedMLflowCallback()
