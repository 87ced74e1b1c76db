"""Can the Triton kernels run here, and which tensor-core paths does this GPU have?

Every check returns ``(ok, reason)`` and is cached, so asking again is free; the reason is what a
backend logs when it falls back, and what a GPU-only test prints when it skips.

Triton's interpreter (``TRITON_INTERPRET=1``) runs the kernels on CPU tensors, slowly, for
tests. It only works when the variable is set *before triton is first imported* in the
process: triton's own library functions (``tl.max``, ``tl.rand``, ...) are built for the
interpreter or for the GPU at import time, and an interpreted kernel cannot call GPU-built
ones. ``triton_available()`` detects that case and says how to fix it, instead of failing
inside a kernel launch.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch

Capability = tuple[bool, str]


def interpret_requested() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's interpreter (whether or not Triton is installed)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def interpreting() -> bool:
    """True when the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``), on CPU tensors.

    A backend's automatic choice should never pick an interpreted kernel for training:
    it is far slower than the emulated path.
    """
    return interpret_requested() and triton_available()[0]


def triton_available() -> Capability:
    """``(True, description)`` when the Triton kernels can be launched in this process.

    Needs triton importable and either a CUDA device (compiled kernels, CUDA tensors) or
    ``TRITON_INTERPRET=1`` set before triton was imported (interpreted kernels, CPU tensors).
    """
    return _triton_available(interpret_requested())


@functools.cache
def _triton_available(interpret: bool) -> Capability:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'triton>=3.6' on Linux with an NVIDIA GPU)"
    try:
        import triton
    except Exception as exc:  # a broken install must not break `import lightning_fpq`
        return False, f"triton is installed but cannot be imported: {exc!r}"
    ok, reason = version_supported(triton.__version__)
    if not ok:
        return ok, reason
    if interpret:
        ok, reason = interpreter_supported(triton.__version__)
        if not ok:
            return ok, reason
        if not _triton_built_for_interpreter():
            return False, (
                "TRITON_INTERPRET=1 was set after triton had been imported in this process, so "
                "triton's own library functions were built for the GPU and the interpreter cannot "
                "call them: set TRITON_INTERPRET=1 in the environment before starting Python"
            )
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1): CPU tensors, slow, for tests"
    if not torch.cuda.is_available():
        return False, (
            "no CUDA device (torch.cuda.is_available() is False); the Triton kernels need an NVIDIA "
            "GPU, or TRITON_INTERPRET=1 set before triton is imported (CPU, slow, for tests)"
        )
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 0):
        return False, f"{torch.cuda.get_device_name()} is sm_{major}{minor}; the kernels need sm_80 or newer"
    return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()} (sm_{major}{minor})"


TRITON_MIN = (3, 6)  # the oldest triton that compiles every kernel launch (tests/test_kernel_compile.py)
INTERPRETER_MIN = (3, 9)  # the oldest triton whose CPU interpreter runs the kernels exactly


def version_supported(version: str) -> Capability:
    """Can triton ``version`` compile the kernels for a GPU?"""
    if _version(version) < TRITON_MIN:
        return False, (
            f"triton {version} is too old for the kernels: they need triton >= {_dotted(TRITON_MIN)} "
            f"(pip install 'triton>={_dotted(TRITON_MIN)}'; older torch releases pin older ones: torch 2.6 brings 3.2)"
        )
    return True, f"triton {version} compiles the kernels"


def interpreter_supported(version: str) -> Capability:
    """Can triton ``version``'s CPU interpreter run the kernels (whether or not it is enabled)?"""
    if _version(version) < INTERPRETER_MIN:
        return False, (
            f"triton {version}'s interpreter cannot run these kernels (3.6-3.8 fail the kernel "
            f"tests: runtime integer arguments and wide float constants); the interpreter needs triton >= "
            f"{_dotted(INTERPRETER_MIN)}, compiled kernels on a GPU >= {_dotted(TRITON_MIN)}"
        )
    return True, f"triton {version}'s interpreter runs the kernels"


def _dotted(version: tuple[int, int]) -> str:
    return ".".join(map(str, version))


def _version(text: str) -> tuple[int, int]:
    major, minor = (text.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _triton_built_for_interpreter() -> bool:
    """Were triton's library functions (``tl.max`` ...) built for the interpreter?"""
    try:
        from triton.language import standard
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:
        return False
    return isinstance(getattr(standard, "sum", None), InterpretedFunction)


def kernel_launchable(kernel) -> Capability:
    """``triton_available()``, plus: was this ``@triton.jit`` kernel built for the current mode?

    A kernel module imported before ``TRITON_INTERPRET=1`` was set holds a GPU-built kernel
    (and the reverse); launching it in the other mode fails deep inside triton.
    """
    ok, reason = triton_available()
    if not ok:
        return ok, reason
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction) != interpret_requested():
        built = "the interpreter" if isinstance(kernel, InterpretedFunction) else "the GPU"
        return False, (
            f"kernel {getattr(kernel, '__name__', kernel)!s} was built for {built} when its module was "
            "imported, but TRITON_INTERPRET has changed since: set it before importing lightning_fpq.kernels"
        )
    return True, reason


def kernel_device() -> Optional[torch.device]:
    """The device the kernels' tensors must live on: cpu when interpreting, cuda otherwise."""
    if not triton_available()[0]:
        return None
    return torch.device("cpu") if interpret_requested() else torch.device("cuda")


def _cuda_capability_at_least(major: int, minor: int, what: str) -> Capability:
    ok, reason = triton_available()
    if not ok:
        return False, reason
    if interpret_requested():
        return (
            False,
            f"{what} needs a GPU of sm_{major}{minor} or newer; the interpreter has none (its path can still be forced for tests)",
        )
    cap = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if cap < (major, minor):
        return False, f"{what} needs sm_{major}{minor} or newer; {name} is sm_{cap[0]}{cap[1]}"
    return True, f"{what} on {name} (sm_{cap[0]}{cap[1]})"


@functools.cache
def _fp8_cached(interpret: bool) -> Capability:
    return _cuda_capability_at_least(8, 9, "FP8 tensor cores (tl.dot on float8e4nv)")


@functools.cache
def _dot_scaled_cached(interpret: bool) -> Capability:
    # sm_90: Triton lowers tl.dot_scaled to an upcast of E2M1 (scale folded in) to bf16 and a
    # software-pipelined bf16 wgmma; sm_100+: native block-scaled MMA (tcgen05)
    return _cuda_capability_at_least(9, 0, "tl.dot_scaled (bf16 wgmma on sm_90, block-scaled FP4 MMA on sm_100+)")


@functools.cache
def _native_fp4_cached(interpret: bool) -> Capability:
    return _cuda_capability_at_least(10, 0, "FP4 tensor cores (tl.dot_scaled lowered to tcgen05 block-scaled MMA)")


def fp8_tensor_cores_available() -> Capability:
    """FP8 ``tl.dot`` (Ada sm_89, Hopper sm_90 and newer)."""
    return _fp8_cached(interpret_requested())


def dot_scaled_available() -> Capability:
    """``tl.dot_scaled`` with E2M1 operands and E8M0 scales: Hopper sm_90 (upcast to bf16 and
    wgmma) and newer (sm_100+: native FP4 tensor cores, :func:`native_fp4_available`)."""
    return _dot_scaled_cached(interpret_requested())


def native_fp4_available() -> Capability:
    """FP4 tensor cores that ``tl.dot_scaled`` lowers to (Blackwell, sm_100 and newer)."""
    return _native_fp4_cached(interpret_requested())


def device_capability() -> Optional[tuple[int, int]]:
    """The compute capability the kernels compile for here; ``None`` under the interpreter or
    without a usable GPU (every path choice then takes its portable branch)."""
    if interpret_requested() or not triton_available()[0]:
        return None
    major, minor = torch.cuda.get_device_capability()
    return major, minor


def require(capability: Capability, what: str) -> None:
    """Raise a RuntimeError naming ``what`` and the capability's reason when it is missing."""
    ok, reason = capability
    if not ok:
        raise RuntimeError(f"{what} cannot run: {reason}")
