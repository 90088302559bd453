# Type stub of the C extension soupkit.kernels._elementwise (src/soupkit/kernels/_elementwise.c).

SET_MUL: int
FMA: int
MUL_ADD: int
SUB_SET_MUL: int
SUB_MUL_ADD: int
DIV: int
SCALE: int
ADD_BASE: int
BLOCK: int

def run(
    n: int,
    out: int,
    out_dtype: int,
    base: int,
    base_dtype: int,
    steps: tuple[tuple[int, int, int, float], ...],
    flags: int,
    total: float,
    lam: float,
    bf16_nan: int,
    f16_block: int,
    f16_tail_nan: int,
    /,
) -> int: ...
def isa() -> str: ...
def best_isa() -> str: ...
def set_isa(name: str, /) -> None: ...
