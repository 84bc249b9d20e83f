"""Rank-aware metrics logging and progress helpers.

``MetricsLogger`` always writes ``metrics.jsonl`` and, on request (``train.report_to``),
mirrors metrics, the resolved config and the run's artifacts to TensorBoard, Weights &
Biases and MLflow. Trackers are offline-safe: each is imported only when asked for; one
that is not installed, cannot reach its server or fails later is reported once and
switched off, and the run goes on with the others and metrics.jsonl. Nothing from the
environment (API keys, credentials in URLs) is ever logged.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tqdm import tqdm

logger = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "mlflow")
_PIP = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
# How long a tracker's server gets to answer before the tracker goes offline (wandb) or
# off (mlflow). A module attribute so tests can shorten it.
PROBE_TIMEOUT_S = 5.0
_TEXT_SUFFIXES = {".json", ".yaml", ".yml", ".txt", ".md", ".csv"}
_TEXT_ARTIFACT_MAX_BYTES = 1 << 20
_SECRET_KEY = re.compile(r"(^|_)(token|api_?key|secret|password|passwd|credentials?)$", re.IGNORECASE)

# Notices are given once per process (not once per logger): a missing package stays missing.
_reported: set[str] = set()


def _report_once(key: str, level: int, msg: str, *args: Any) -> None:
    if key in _reported:
        return
    _reported.add(key)
    logger.log(level, msg, *args)


def _safe_url(url: str) -> str:
    """``url`` without user:password@ (tracking URIs may carry credentials)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _reachable(url: str) -> str | None:
    """None if a server answers at ``url`` (any HTTP status counts: 401 and 404 are
    answers), else the reason. Honours the usual *_proxy variables."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S):
            return None
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as e:
        return str(e.reason)
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"


def _redact(value: Any) -> Any:
    """A copy of a config tree with secret-looking keys' values replaced."""
    if isinstance(value, dict):
        return {k: "<redacted>" if _SECRET_KEY.search(str(k)) and v is not None else _redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact(v) for v in value]
    return value


def _config_text(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


# ------------------------------------------------------------------------------ trackers


class _Tracker:
    """One tracker. Methods may raise: MetricsLogger turns any error into one warning and
    switches the tracker off."""

    name = ""

    def log_metrics(self, scalars: dict[str, float], step: int, stage: str | None) -> None:
        raise NotImplementedError

    def log_config(self, config: dict) -> None:
        raise NotImplementedError

    def log_artifact(self, path: Path) -> None:
        raise NotImplementedError

    def close(self, failed: bool) -> None:
        raise NotImplementedError


class _TensorBoard(_Tracker):
    name = "tensorboard"

    def __init__(self, out: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # ImportError without the tensorboard package

        self.writer = SummaryWriter(str(out / "tensorboard"))
        logger.info("tensorboard: writing to %s (tensorboard --logdir %s)", out / "tensorboard", out / "tensorboard")

    def log_metrics(self, scalars: dict[str, float], step: int, stage: str | None) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=step)

    def log_config(self, config: dict) -> None:
        # Indented: TensorBoard's text plugin renders markdown, and this makes a code block.
        self.writer.add_text("config", "".join(f"    {line}\n" for line in _config_text(config).splitlines()))
        self.writer.flush()

    def log_artifact(self, path: Path) -> None:
        if path.suffix.lower() == ".png":
            import matplotlib.image

            self.writer.add_image(path.stem, matplotlib.image.imread(str(path)), global_step=0, dataformats="HWC")
        elif path.suffix.lower() in _TEXT_SUFFIXES and path.stat().st_size <= _TEXT_ARTIFACT_MAX_BYTES:
            text = path.read_text(encoding="utf-8", errors="replace")
            self.writer.add_text(path.stem, "".join(f"    {line}\n" for line in text.splitlines()))
        else:
            logger.debug("tensorboard: %s is neither an image nor a small text file; not attached", path)
            return
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


def _wandb_has_api_key(base_url: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:  # `wandb login` stores the key in ~/.netrc (or $NETRC) under the server's host
        return netrc.netrc(os.environ.get("NETRC") or None).authenticators(urlsplit(base_url).hostname or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class _WandB(_Tracker):
    name = "wandb"

    def __init__(self, out: Path) -> None:
        import wandb  # ImportError without the wandb package

        self.wandb = wandb
        mode = os.environ.get("WANDB_MODE")  # the user's choice (online, offline, disabled) is kept as is
        if not mode:
            base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
            if not _wandb_has_api_key(base_url):
                mode = "offline"
                _report_once("wandb:nokey", logging.WARNING,
                             "wandb: no API key (WANDB_API_KEY or `wandb login`); logging offline under %s "
                             "(upload later with `wandb sync %s/offline-run-*`)", out / "wandb", out / "wandb")
            else:
                reason = _reachable(_safe_url(base_url))
                if reason is not None:
                    mode = "offline"
                    _report_once("wandb:unreachable", logging.WARNING,
                                 "wandb: cannot reach %s (%s); logging offline under %s "
                                 "(upload later with `wandb sync %s/offline-run-*`)",
                                 _safe_url(base_url), reason, out / "wandb", out / "wandb")
        kwargs: dict[str, Any] = {"dir": str(out), "project": os.environ.get("WANDB_PROJECT") or "loradrop_ds"}
        if not os.environ.get("WANDB_NAME"):
            kwargs["name"] = out.resolve().name
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as e:  # noqa: BLE001 - e.g. an online init that times out: keep the run, locally
            if mode == "offline":
                raise
            _report_once("wandb:initfailed", logging.WARNING, "wandb: init in %s mode failed (%s: %s); logging offline "
                         "under %s", mode, type(e).__name__, e, out / "wandb")
            self.run = wandb.init(mode="offline", **kwargs)
        self._step_metrics: set[str] = set()

    def log_metrics(self, scalars: dict[str, float], step: int, stage: str | None) -> None:
        # Each stage counts its own steps from 0; wandb drops rows whose step goes back. So
        # every stage gets its own x axis (STAGE/step) and wandb's own counter stays monotonic.
        step_key = f"{stage}/step" if stage else "step"
        for key in scalars:
            if key not in self._step_metrics:
                self._step_metrics.add(key)
                self.run.define_metric(key, step_metric=step_key)
        self.run.log({**scalars, step_key: step})

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_artifact(self, path: Path) -> None:
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)
        # finish() can return before wandb's service process has written the run to disk;
        # the launcher then ends this process without interpreter shutdown. teardown()
        # waits for the service to flush and exit.
        self.wandb.teardown()


def _mlflow_local_store(out: Path) -> tuple[str, str | None]:
    """The tracking URI (and artifact location) when MLFLOW_TRACKING_URI is not set: a
    store inside output_dir, never the working directory. SQLite (out/mlflow.db, files in
    out/mlartifacts) where SQLAlchemy is installed, as with `pip install mlflow`; else
    (mlflow-skinny) the file store out/mlruns, which MLflow 3 keeps only on request."""
    out = out.resolve()
    try:
        import sqlalchemy  # noqa: F401
    except ImportError:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return (out / "mlruns").as_uri(), None
    return f"sqlite:///{out / 'mlflow.db'}", (out / "mlartifacts").as_uri()


class _MLflow(_Tracker):
    name = "mlflow"

    def __init__(self, out: Path) -> None:
        from mlflow.tracking import MlflowClient  # ImportError without the mlflow package

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        artifact_location = None
        if not uri:
            uri, artifact_location = _mlflow_local_store(out)
        if urlsplit(uri).scheme in ("http", "https"):
            # MLflow retries an unreachable server for minutes per call; ask once, briefly.
            reason = _reachable(_safe_url(uri).rstrip("/") + "/health")
            if reason is not None:
                raise ConnectionError(f"cannot reach {_safe_url(uri)} ({reason})")
        from mlflow.entities import Metric, Param

        self.Metric, self.Param = Metric, Param
        self.client = MlflowClient(tracking_uri=uri)
        experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
        if not experiment_id:
            experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "loradrop_ds"
            experiment = self.client.get_experiment_by_name(experiment_name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                experiment_name, artifact_location=artifact_location)
        self.run_id = self.client.create_run(experiment_id, run_name=out.resolve().name).info.run_id
        logger.info("mlflow: run %s in experiment %s at %s", self.run_id, experiment_id, _safe_url(uri))

    def log_metrics(self, scalars: dict[str, float], step: int, stage: str | None) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, v, now, step) for k, v in scalars.items()])

    def log_config(self, config: dict) -> None:
        from .config import dotted  # config imports this module (TRACKERS)

        params = [self.Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
                  for k, v in dotted(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_dict(self.run_id, config, "config.yaml")

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


_TRACKER_CLASSES: dict[str, type[_Tracker]] = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


def _start_tracker(name: str, out: Path) -> _Tracker | None:
    try:
        return _TRACKER_CLASSES[name](out)
    except ImportError as e:
        _report_once(f"{name}:missing", logging.WARNING,
                     "report_to: %s is not installed (pip install %s); metrics go to metrics.jsonl and the "
                     "other trackers (%s)", name, _PIP[name], e)
    except Exception as e:  # noqa: BLE001 - a tracker must never stop the run
        _report_once(f"{name}:start", logging.WARNING, "report_to: %s is off for this run: %s: %s; metrics go to "
                     "metrics.jsonl and the other trackers", name, type(e).__name__, e)
    return None


def _to_python(value: Any) -> Any:
    """Turn tensors / numpy scalars (anything with a scalar .item()) into plain
    Python values so json can write them; containers are converted recursively."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    item = getattr(value, "item", None)
    if callable(item):
        try:
            # 0-d / 1-element torch tensors and numpy scalars; .item() keeps the
            # dtype kind (float stays float, int stays int).
            return _to_python(item())
        except (ValueError, RuntimeError, TypeError):
            pass  # multi-element array: fall through to tolist/str
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        try:
            return _to_python(tolist())
        except Exception:  # noqa: BLE001 - logging must never break training
            pass
    return str(value)


class MetricsLogger:
    """Append-only metrics sink. Construct on every rank; pass enabled=False on
    non-zero ranks so call sites need no rank checks (and nothing is imported there).

    ``report_to``: any of ``TRACKERS``. Empty (the default) writes metrics.jsonl only:
    TensorBoard is a tracker like the others and is written only when named.
    """

    def __init__(self, output_dir: str | os.PathLike, enabled: bool, report_to: Sequence[str] = ()) -> None:
        self.enabled = enabled
        self._file: Any | None = None
        self._trackers: list[_Tracker] = []
        self._closed = False
        if isinstance(report_to, str):
            report_to = [report_to]
        unknown = sorted(set(report_to) - set(TRACKERS))
        if unknown:
            raise ValueError(f"report_to: unknown tracker(s) {unknown}; choose from {', '.join(TRACKERS)}")
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        # Line-buffered append: each record hits the OS as it is written, and
        # restarts/resumes keep extending the same file.
        self._file = open(out / "metrics.jsonl", "a", encoding="utf-8", buffering=1)
        for name in dict.fromkeys(report_to):  # de-duplicated, in order
            tracker = _start_tracker(name, out)
            if tracker is not None:
                self._trackers.append(tracker)

    @property
    def active_trackers(self) -> list[str]:
        return [t.name for t in self._trackers]

    def _each_tracker(self, method: str, *args: Any) -> None:
        for tracker in list(self._trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:  # noqa: BLE001 - a tracker must never stop the run
                self._trackers.remove(tracker)
                _report_once(f"{tracker.name}:failed", logging.WARNING,
                             "report_to: %s failed in %s (%s: %s) and is off for the rest of this run; "
                             "metrics.jsonl and the other trackers go on", tracker.name, method, type(e).__name__, e)
                if method != "close":
                    try:
                        tracker.close(failed=True)
                    except Exception:  # noqa: BLE001
                        pass

    def log(self, record: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        if self._closed:
            raise RuntimeError("MetricsLogger.log called after close()")
        # step/time come from the arguments; same-named record keys are ignored.
        line: dict[str, Any] = {"step": int(step), "time": time.time()}
        for key, value in record.items():
            if key not in line:
                line[str(key)] = _to_python(value)
        # default=str is a last resort so an odd value can never raise here.
        self._file.write(json.dumps(line, default=str) + "\n")
        self._file.flush()

        if self._trackers:
            stage = line.get("stage")
            stage = stage if isinstance(stage, str) and stage else None
            prefix = f"{stage}/" if stage else ""
            scalars = {f"{prefix}{key}": float(value) for key, value in line.items()
                       if key not in ("step", "time") and isinstance(value, (int, float))}  # bool included, as 0/1
            if scalars:
                self._each_tracker("log_metrics", scalars, int(step), stage)

    def log_config(self, config: dict[str, Any]) -> None:
        """The resolved config, to every tracker (hyperparameters / a config text).
        Values of secret-looking keys (token, api_key, password, ...) are replaced."""
        if self.enabled and self._trackers:
            self._each_tracker("log_config", _redact(_to_python(config)))

    def log_artifact(self, path: str | os.PathLike) -> None:
        """Attach a file the run wrote (selection.json, importance.png) to every tracker."""
        if not self.enabled or not self._trackers:
            return
        path = Path(path)
        if not path.is_file():
            logger.warning("log_artifact: %s is not a file; not attached", path)
            return
        self._each_tracker("log_artifact", path)

    def close(self, failed: bool = False) -> None:
        """Close metrics.jsonl and finish every tracker (``failed``: mark the tracker run
        failed, where the tracker has such a state)."""
        if self._closed:
            return
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None
        self._each_tracker("close", failed)
        self._trackers = []

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(failed=exc_type is not None)


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    """tqdm bar that is silently disabled (but still callable) on non-zero ranks."""
    return tqdm(total=total, desc=desc, dynamic_ncols=True, mininterval=1.0, disable=not enabled)


_SUFFIXES = ("K", "M", "B", "T")


def format_count(n: int | float) -> str:
    """Human-readable count: 999 -> "999", 1234 -> "1.23K", 4_194_304 -> "4.19M"."""
    if not math.isfinite(n):
        raise ValueError(f"format_count: expected a finite number, got {n!r}")
    if abs(n) < 1000:
        return str(int(n))
    value = float(n)
    for suffix in _SUFFIXES:
        value /= 1000.0
        # Promote when rounding would print "1000.00K" (e.g. 999_999 -> "1.00M").
        if round(abs(value), 2) < 1000 or suffix == _SUFFIXES[-1]:
            return f"{value:.2f}{suffix}"
    raise AssertionError("unreachable")


def setup_logging(is_main: bool) -> None:
    """INFO on rank 0, WARNING elsewhere; the libraries' per-step noise off."""
    import warnings

    import datasets

    datasets.disable_progress_bars()
    # DeepSpeed 0.19 calls torch.distributed APIs that torch 2.13 deprecates, once per step.
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated",
                            category=FutureWarning)
    # peft 0.21 asks transformers 5.x for `is_gradient_checkpointing`, deprecated there, at every wrap.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def summary_text(summary: dict) -> str:
    """The few lines a run ends with, from its summary.json."""
    def acc(d: dict) -> str:
        return f"{d['eval_accuracy']:.1%}" if "eval_accuracy" in d else "n/a"

    zero, final = summary.get("zero_shot", {}), summary.get("final", {})
    lines = ["", "=== loradrop_ds run summary ==="]
    if zero or final:
        lines.append(f"accuracy: zero-shot {acc(zero)} -> final {acc(final)}   eval loss "
                     f"{zero.get('eval_loss', float('nan')):.4f} -> {final.get('eval_loss', float('nan')):.4f}")
    if "kept_layers" in summary:
        lines.append(f"kept layers ({len(summary['kept_layers'])} of {summary['num_layers']}): {summary['kept_layers']}")
    lines.append(f"trainable parameters: {format_count(summary['trainable_params'])} vs plain LoRA "
                 f"{format_count(summary['plain_lora_params'])} "
                 f"({100.0 * summary['trainable_params'] / summary['plain_lora_params']:.1f}%)")
    main = summary.get("main", {})
    if "tokens_per_s_per_rank" in main:
        mfu = f", MFU {main['mfu']:.1%}" if main.get("mfu") is not None else ""
        reserved = f" ({main['peak_reserved_gib']:.1f} GiB reserved)" if "peak_reserved_gib" in main else ""
        planned = f", planned {main['planned_peak_gib']:.1f} GiB of tensors" if "planned_peak_gib" in main else ""
        lines.append(f"main stage per GPU: {main['tokens_per_s_per_rank']:,.0f} tokens/s, "
                     f"{main.get('tflops_per_rank', 0.0):.2f} TFLOP/s{mfu}, peak memory {main['peak_memory_gib']:.1f} GiB"
                     f"{reserved}{planned}")
    lines.append(f"wall time: {summary['wall_seconds_this_process']:.0f} s"
                 + (f" (resumed from {summary['resumed_from']})" if summary.get("resumed_from") else ""))
    return "\n".join(lines)
