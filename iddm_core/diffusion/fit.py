"""Will it fit? One trial step of each heavy kind before a long run, so an out-of-memory error comes first.

IDDM's first Stage II PGD step comes after a whole fine-tune burst; on a card that is too small it would fail
there, minutes to hours in. :func:`check_fits` runs one fine-tune forward/backward (nothing updated) and one
Stage II PGD step on one micro-batch (result thrown away, its own random generator) before anything else, and
turns an out-of-memory error into an :class:`InputError` that says what to change. The run's results are the
same with or without the check.

On the CPU (Linux) running out of memory is not an exception but the kernel killing the process, so the trial
steps run under :func:`cpu_memory_cap`: the address-space limit of the process is lowered to what it uses now
plus the memory the system says is available, for the duration of the trials only, and an allocation past it
raises in torch instead. Before a model is even loaded, :func:`check_weights_fit` compares its weights' size with
the free memory of the device it goes to.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys

import torch

from ..errors import InputError

GIB = 2 ** 30


def _proc_field(path: str, name: str) -> int | None:
    """A ``kB`` field of a /proc file in bytes, or None (not Linux, field absent)."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_bytes(device) -> int | None:
    """Memory a new allocation can still get: free CUDA memory, or the OS's MemAvailable + free swap (Linux);
    None where it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    avail = _proc_field("/proc/meminfo", "MemAvailable")
    return None if avail is None else avail + (_proc_field("/proc/meminfo", "SwapFree") or 0)


@contextlib.contextmanager
def cpu_memory_cap(headroom_bytes: int | None = None):
    """Within the block, an allocation that would need more memory than the system has raises (torch:
    ``RuntimeError ... can't allocate memory``) instead of waking the kernel's out-of-memory killer.

    Linux only (elsewhere, or if the limit cannot be set, a no-op): the soft ``RLIMIT_AS`` becomes this process's
    current address-space size plus ``headroom_bytes`` (default: :func:`available_bytes`), and is restored on
    exit. The limit is process-wide: other threads' allocations meet it too while the block runs.
    """
    if not sys.platform.startswith("linux"):
        yield
        return
    import resource

    size = _proc_field("/proc/self/status", "VmSize")
    headroom = available_bytes("cpu") if headroom_bytes is None else headroom_bytes
    if size is None or headroom is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = size + headroom
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    if soft != resource.RLIM_INFINITY and soft <= cap:      # already stricter: leave it
        yield
        return
    try:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, the CPU allocator's failure under :func:`cpu_memory_cap`, or a MemoryError."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def weight_bytes(parameter_counts: dict, dtypes: dict) -> int:
    """Bytes the weights take: ``{part: parameters}`` times the element size of ``{part: dtype}`` (fp32 if absent)."""
    return sum(n * torch.empty((), dtype=dtypes.get(part, torch.float32)).element_size()
               for part, n in parameter_counts.items())


def check_weights_fit(parameter_counts: dict, dtypes: dict, device, what: str) -> None:
    """Refuse, before loading, a model whose weights alone exceed the device's available memory."""
    need = weight_bytes(parameter_counts, dtypes)
    have = available_bytes(device)
    if have is not None and need > have:
        where = "GPU" if torch.device(device).type == "cuda" else "RAM (+ swap)"
        raise InputError(
            f"not enough memory for {what}: its weights alone take {need / GIB:.1f} GiB, {have / GIB:.1f} GiB of "
            f"{where} is available. Nothing was loaded. Close other programs"
            + (", or train on a GPU" if torch.device(device).type == "cpu" else ", or use a GPU with more memory")
            + ".")


def advice(batch: int, gradient: str | None, runtime, resolution: int) -> list[str]:
    """What would lower memory, given what is already set (most effective first). ``gradient``: IDDM's PGD gradient
    mode, None for attacks that have none (protect); ``runtime``: the run's runtime.Runtime."""
    tips = []
    if batch > 1:
        tips.append("pgd_batch 1")
    if not runtime.checkpointing:
        tips.append("gradient checkpointing on (--checkpointing yes)")
    if runtime.precision.name == "fp32":
        tips.append("mixed precision (--precision auto on a GPU)")
    if gradient in ("full", "sds"):
        tips.append("gradient 'fast' (Stage II on a window around the face)")
    if resolution > 256:
        tips.append(f"a lower resolution than {resolution}")
    return tips


def memory_text(device) -> str:
    if torch.device(device).type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return f" ({free / GIB:.1f} of {total / GIB:.1f} GiB were free before the run)"
    have = available_bytes(device)
    return "" if have is None else f" ({have / GIB:.1f} GiB of RAM + swap were available before the trial)"


def check_model_fits(info, runtime) -> None:
    """:func:`check_weights_fit` for a ``models.ModelInfo`` as ``load_model`` will store it on the device of
    ``runtime`` (a runtime.Runtime) in its ``weight_dtypes``."""
    check_weights_fit(info.parameters, runtime.weight_dtypes, runtime.device, f"the model {info.title!r} ({info.kind})")


def check_fits(trial_finetune, trial_pgd, runtime, batch: int, gradient: str | None, resolution: int,
               pgd_step: str = "a Stage II PGD step", callback=None) -> None:
    """Run the two trial steps on ``runtime.device``; raise InputError with advice if either runs out of memory.
    ``batch``/``gradient``: the PGD micro-batch and gradient mode in effect (None: the attack has no modes);
    ``pgd_step`` names the second trial in the message. ``callback(Event)``: a ``"setup"`` event (stage
    ``"trial"``) before each trial, which may raise to cancel (events.report_setup)."""
    from ..events import report_setup

    device = runtime.device
    before = memory_text(device)
    on_cpu = device.type == "cpu"
    for what, trial in (("a fine-tune step", trial_finetune), (pgd_step, trial_pgd)):
        report_setup(callback, "trial", f"trial step (will it fit in memory?): {what}")
        try:
            with cpu_memory_cap() if on_cpu else contextlib.nullcontext():
                trial()
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            tips = advice(batch, gradient, runtime, resolution)
            mode = f", gradient {gradient}" if gradient is not None else ""
            raise InputError(
                f"not enough memory for these settings: {what} ran out of memory at {resolution}px, "
                f"pgd_batch {batch}, precision {runtime.precision.name}, checkpointing "
                f"{'on' if runtime.checkpointing else 'off'}{mode}{before}. Nothing was trained. "
                + (f"Try: {'; '.join(tips)}." if tips else "")) from None
    if device.type == "cuda":
        torch.cuda.empty_cache()


def trial_pgd_config(pgd_config):
    """One Stage II step (floor(rho * 1) = 0 Stage I steps): the heaviest kind."""
    return dataclasses.replace(pgd_config, T=1)
