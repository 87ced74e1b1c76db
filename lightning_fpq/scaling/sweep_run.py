"""One run of the sweep: build its data and model (the embedded corpus and the demo GPT, or
classes given by import path), train it with its format and block size, validate once at its
last step, and return its CSV row."""

from __future__ import annotations

import importlib
import inspect
import math
import time
from collections.abc import Callable
from typing import Any, Optional, Union

from .sweep_config import SweepConfig, plain
from .sweep_plan import RunSpec, run_steps

__all__ = ["failed_row", "import_path", "one_line", "run_one", "run_row"]

_REASON_CHARS = 300


def import_path(path: str, what: str) -> Any:
    """The object at ``package.module.Name``; ImportError naming ``what`` and the path if it cannot be had."""
    module_name, _, attr = path.strip().rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise ImportError(
            f"{what} {path!r}: cannot import module {module_name!r}: {type(err).__name__}: {err}"
        ) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}") from None


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _build_datamodule(cfg: SweepConfig, spec: RunSpec, steps: Optional[int]):
    if cfg.datamodule is None:
        from ..demo.data import ByteCorpusDataModule

        return ByteCorpusDataModule(
            block_size=cfg.seq_len,
            batch_size=cfg.batch_size,
            max_bytes=cfg.max_bytes,
            seed=spec.seed,
            samples_per_epoch=max(1, steps or 1) * cfg.batch_size,
            val_samples=cfg.val_samples,
        )
    cls = import_path(cfg.datamodule, "datamodule")
    kwargs = dict(plain(cfg.datamodule_args))
    if "seed" not in kwargs and _accepts(cls, "seed"):
        kwargs["seed"] = spec.seed
    return cls(**kwargs)


def _tokens_per_step(cfg: SweepConfig, datamodule: Any) -> int:
    if cfg.tokens_per_step is not None:
        return cfg.tokens_per_step
    if cfg.datamodule is None:
        return cfg.batch_size * cfg.seq_len
    per_batch = getattr(datamodule, "tokens_per_batch", None)
    if isinstance(per_batch, int) and per_batch > 0:
        return per_batch
    from ..lightning.tokens import count_batch_tokens

    try:
        if hasattr(datamodule, "prepare_data"):
            datamodule.prepare_data()
        datamodule.setup("fit")
        batch = next(iter(datamodule.train_dataloader()))
        return int(count_batch_tokens(batch))
    except Exception as err:
        raise ValueError(
            f"cannot tell how many tokens a step of {cfg.datamodule} holds ({type(err).__name__}: {err}): "
            "set tokens_per_step in the sweep config"
        ) from None


def _build_model(cfg: SweepConfig, spec: RunSpec, steps: int):
    size = cfg.models[spec.model]
    if cfg.model is None:
        from ..demo.model import GPTConfig, GPTLightning

        gpt = GPTConfig(
            block_size=cfg.seq_len, n_layer=size.n_layer, n_head=size.n_head, n_embd=size.n_embd, **plain(size.args)
        )
        return GPTLightning(
            gpt,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            warmup_steps=cfg.warmup_steps,
            max_steps=steps,
            min_lr_ratio=cfg.min_lr_ratio,
        )
    cls = import_path(cfg.model, "model")
    kwargs = {**plain(cfg.model_args), **plain(size.args)}
    for key in ("n_layer", "n_head", "n_embd"):
        if getattr(size, key) is not None:
            kwargs.setdefault(key, getattr(size, key))
    shared = {
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "warmup_steps": cfg.warmup_steps,
        "max_steps": steps,
        "min_lr_ratio": cfg.min_lr_ratio,
    }
    for key, value in shared.items():
        if key not in kwargs and _accepts(cls, key):
            kwargs[key] = value
    return cls(**kwargs)


def _recipe(cfg: SweepConfig, spec: RunSpec):
    from ..recipe import QuantRecipe

    if not spec.quantized:
        return QuantRecipe.from_name("bf16")
    return QuantRecipe.coerce(cfg.recipe).with_format(spec.fmt, block_size=spec.block_size)


def _recorder_callback(train_metric: str):
    """A callback that counts training tokens and keeps the per-step training losses."""
    from lightning.pytorch import Callback

    from ..lightning.tokens import count_batch_tokens

    class _Recorder(Callback):
        def __init__(self) -> None:
            self.tokens = 0
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.tokens += int(count_batch_tokens(batch))
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if loss is None:
                loss = trainer.callback_metrics.get(train_metric)
            if loss is not None:
                self.losses.append(float(loss))

    return _Recorder()


def one_line(err: Union[BaseException, str]) -> str:
    """An exception (``Type: message``) or a text as one line of at most 300 characters: a CSV reason."""
    text = " ".join((err if isinstance(err, str) else f"{type(err).__name__}: {err}").split())
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


def run_one(cfg: SweepConfig, spec: RunSpec) -> dict[str, Any]:
    """Train and validate one run; returns its CSV row (status ``ok``). Raises on failure."""
    from lightning.pytorch import Trainer, seed_everything

    from ..lightning.precision import FPQuantPrecision
    from .params import count_params

    seed_everything(spec.seed, verbose=False)
    if cfg.datamodule is None:
        tps = cfg.batch_size * cfg.seq_len if cfg.tokens_per_step is None else cfg.tokens_per_step
        steps = run_steps(spec.tokens, tps)
        datamodule = _build_datamodule(cfg, spec, steps)
    else:
        datamodule = _build_datamodule(cfg, spec, None)
        tps = _tokens_per_step(cfg, datamodule)
        steps = run_steps(spec.tokens, tps)
    if cfg.warmup_steps >= steps:
        raise ValueError(
            f"warmup_steps={cfg.warmup_steps} is not below this run's {steps} steps "
            f"(tokens={spec.tokens} at {tps} tokens per step): lower warmup_steps or raise tokens"
        )
    seed_everything(spec.seed, verbose=False)  # the model's init does not depend on what building the data drew
    model = _build_model(cfg, spec, steps)
    n_params = count_params(model)
    plugin = FPQuantPrecision(recipe=_recipe(cfg, spec), compute_dtype=cfg.compute_dtype)
    recorder = _recorder_callback(cfg.train_metric)
    trainer = Trainer(
        accelerator=cfg.accelerator,
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        plugins=[plugin],
        callbacks=[recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=None,
        val_check_interval=steps,
        log_every_n_steps=max(1, min(50, steps)),
    )
    trainer.fit(model, datamodule=datamodule)
    if trainer.global_step < steps:
        raise RuntimeError(f"training stopped at step {trainer.global_step} of {steps} (the data ran out?)")
    val = trainer.callback_metrics.get(cfg.val_metric)
    if val is None:  # the datamodule's loop did not reach the validation point: validate once more
        trainer.validate(model, datamodule=datamodule, verbose=False)
        val = trainer.callback_metrics.get(cfg.val_metric)
    if val is None:
        logged = sorted(trainer.callback_metrics)
        raise ValueError(f"the model logged no {cfg.val_metric!r} (it logged {logged}): set val_metric")
    loss = float(val)
    if not math.isfinite(loss):
        raise FloatingPointError(f"validation loss is {loss} (the run diverged)")
    tail = recorder.losses[-max(1, len(recorder.losses) // 10) :]
    return {
        "N": n_params,
        "D": recorder.tokens or steps * tps,
        "steps": steps,
        "loss": loss,
        "train_loss": sum(tail) / len(tail) if tail else None,
    }


def _row_head(cfg: SweepConfig, spec: RunSpec, settings: str) -> dict[str, Any]:
    return {
        "run_id": spec.run_id,
        "model": spec.model,
        "format": spec.fmt,
        "E": spec.ebits,
        "M": spec.mbits,
        "B": spec.block_size,
        "seed": spec.seed,
        "recipe": cfg.recipe if spec.quantized else "bf16",
        "settings": settings,
        "D": spec.tokens,
    }


def run_row(cfg: SweepConfig, spec: RunSpec, settings: str) -> dict[str, Any]:
    """Run ``spec`` and return its CSV row: status ``ok`` with the results, or ``failed`` with the
    reason (a run that raises does not stop the sweep), and its wall and CPU seconds."""
    row = _row_head(cfg, spec, settings)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        row.update(run_one(cfg, spec))
        row["status"] = "ok"
    except KeyboardInterrupt:
        raise
    except Exception as err:  # the run failed: record why and go on
        row.update(status="failed", reason=one_line(err))
    row["wall_s"] = time.perf_counter() - t0
    row["cpu_s"] = time.process_time() - c0
    row["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return row


def failed_row(cfg: SweepConfig, spec: RunSpec, settings: str, reason: str, wall_s: float) -> dict[str, Any]:
    """The row of a run that never returned one (its worker died, or the executor could not get its
    result): status ``failed`` with ``reason``; no CPU time is known."""
    row = _row_head(cfg, spec, settings)
    row.update(status="failed", reason=one_line(reason), wall_s=wall_s, finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return row
