"""The oldest versions of torch, triton and transformers this release supports, checked where each is needed.

torch at ``import deepseek_moe``; transformers at ``import deepseek_moe.hf`` (only when it is installed: without it
``deepseek_moe.hf`` still imports and its functions need a block or model that only transformers makes);
triton when the triton backend is selected. Below a floor the part raises ImportError (triton: the backend is
unavailable, saying so) with one message naming the floor and the upgrade command. Why each floor
(docs/versions.md): torch 2.9 fails fullgraph compiles of the layer, 2.8 has a CUDA-only ``_grouped_mm`` that the
CPU path would meet, 2.7 none and gives a wrong expert-parallel x FSDP2 router gradient, 2.4 cannot infer the
custom ops' schemas; triton 3.6 is what torch 2.10 pins; transformers before 5.19 computes DeepSeek-V2/V3 routing
and records router logits differently from the blocks this release converts.

Reads installed metadata only: nothing here imports torch, triton or transformers.
"""
from __future__ import annotations

import re
from importlib import metadata
from typing import Optional, Tuple

FLOORS = {"torch": "2.10", "triton": "3.6", "transformers": "5.19"}
_UPGRADE = {"torch": "pip install -U 'torch>={}'", "triton": "pip install -U 'triton>={}'",
            "transformers": "pip install -U 'transformers>={}'"}


def parse(version: str) -> Tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13, 0); pre-releases count as their release ('2.10.0rc1' -> (2, 10, 0))."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def installed(distribution: str) -> Optional[str]:
    """The installed version of ``distribution``, or None."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def below_floor(distribution: str, version: Optional[str] = None) -> Optional[str]:
    """The message for ``distribution`` at ``version`` (default: the installed one) below its floor, else None
    (also when it is not installed)."""
    version = installed(distribution) if version is None else version
    floor = FLOORS[distribution]
    if version is None or parse(version) >= parse(floor):
        return None
    return (f"deepseek_moe needs {distribution}>={floor} (found {version}); upgrade with: "
            f"{_UPGRADE[distribution].format(floor)}")


def require(distribution: str, version: Optional[str] = None) -> None:
    """Raise ImportError with :func:`below_floor`'s message when ``distribution`` is below its floor."""
    message = below_floor(distribution, version)
    if message is not None:
        raise ImportError(message)
