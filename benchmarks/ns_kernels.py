"""Newton-Schulz kernels: do a symmetric X X^T or the Gram form pay, and at what accuracy?

    python benchmarks/ns_kernels.py [--models gpt2-small,llama3-8b] [--device cpu|cuda]
                                    [--repeats 3] [--json benchmarks/results/ns_kernels.json]

For each distinct matrix shape (m, n), m <= n, of the models, in bf16:

- ``plain``: marsm_dist.newton_schulz's plain form (the default in bf16), 5 iterations, with
  every X X^T as one full product: its time,
  its TFLOP/s and that as a fraction of the matmul rate measured on the same shape
  (benchmarks/roofline.py: one iteration's three products);
- ``symmetric``: X X^T from its 2 x 2 blocks of rows, the diagonal blocks and one off-diagonal
  block (3/4 of the FLOPs), mirrored (marsm_dist/ns_products.py: what the CPU step now does for
  2-D matrices of 256 rows or more): the time of that product against one X X^T product, of a
  whole Newton-Schulz with it, and the largest difference from the full products' result (a
  symmetric-product kernel only pays if its saving survives the extra launches and the mirror copy);
- ``gram``: the Gram form in bf16 (``form="gram"``): its time and its orthogonality error.

Two errors per form: the orthogonality error, the relative Frobenius distance of NS(G) from U V^T
(an SVD in float64) on a Gaussian G; and the rounding error, the distance from the same iteration
in float64, on a Gaussian, a graded (singular values 1 to 1e-6) and a rank-8 G, where the Gram
form's risk lies. A form is adoptable only within the plain bf16 form's errors.
On a CPU the figures say what this CPU does; the GPU question (issue 26, item 5) needs the same
command with ``--device cuda``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.cpu_kinds import machine as cpu_machine  # noqa: E402
from benchmarks.results_file import save_results  # noqa: E402
from benchmarks.roofline import best_seconds, measure_matmul_rate, ns_key  # noqa: E402
from benchmarks.shapes import model_shapes  # noqa: E402
from marsm_dist import ns_products  # noqa: E402
from marsm_dist.newton_schulz import newton_schulz, newton_schulz_flops  # noqa: E402
from marsm_dist.ns_products import symmetric_gram  # noqa: E402

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "ns_kernels.json"


@contextlib.contextmanager
def full_products() -> Iterator[None]:
    """Newton-Schulz with every X X^T as one full product (what marsm_dist did before it formed
    large CPU ones by blocks, marsm_dist/ns_products.py): the baseline of the comparison."""
    saved = ns_products.SYMMETRIC_MIN_ROWS
    ns_products.SYMMETRIC_MIN_ROWS = 1 << 62
    try:
        yield
    finally:
        ns_products.SYMMETRIC_MIN_ROWS = saved


def orthogonality_error(g: torch.Tensor, x: torch.Tensor) -> float:
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    polar = u @ vh
    return ((x.double() - polar).norm() / polar.norm()).item()


def test_inputs(m: int, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A Gaussian matrix, one with singular values from 1 down to 1e-6 (ill-conditioned, as late
    momenta are), and a rank-8 one: the Gram form's risk is in the small singular values."""
    gauss = torch.randn(m, n, generator=gen)
    u, _, vh = torch.linalg.svd(gauss, full_matrices=False)
    graded = u @ torch.diag(torch.logspace(0, -6, m)) @ vh
    low = torch.randn(m, 8, generator=gen) @ torch.randn(8, n, generator=gen)
    return {"gaussian": gauss, "graded": graded, "rank8": low}


def rounding_error(g: torch.Tensor, form: str) -> float:
    """How far bf16 rounding takes ``form`` from the same iteration in float64 (relative Frobenius):
    the quintic is not the polar factor (it plateaus), so this isolates what the form adds."""
    exact = newton_schulz(g.double(), 5, dtype=torch.float64, form="plain")
    got = newton_schulz(g, 5, dtype=torch.bfloat16, form=form).double()
    return ((got - exact).norm() / exact.norm()).item()


def measure_shape(m: int, n: int, device: torch.device, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    inputs = {k: v.to(device) for k, v in test_inputs(m, n, gen).items()}
    g = inputs["gaussian"]
    x = (g / g.norm()).to(torch.bfloat16)
    bf16 = torch.bfloat16
    with full_products():
        plain_s = best_seconds(lambda: newton_schulz(g, 5, dtype=bf16, form="plain"), device, repeats)
        full_result = newton_schulz(g, 5, dtype=bf16, form="plain")
        gram_s = best_seconds(lambda: newton_schulz(g, 5, dtype=bf16, form="gram"), device, repeats)
    sym_ns_s = best_seconds(lambda: newton_schulz(g, 5, dtype=bf16, form="plain"), device, repeats)
    blocked = newton_schulz(g, 5, dtype=bf16, form="plain").float()
    sym_diff = (blocked - full_result.float()).abs().max().item()
    full_s = best_seconds(lambda: x @ x.mT, device, repeats)
    sym_s = best_seconds(lambda: symmetric_gram(x), device, repeats)
    flops = newton_schulz_flops((m, n), 5)
    rate = measure_matmul_rate([(m, n)], bf16, device, repeats)[(m, n)]
    return {
        "shape": [m, n], "plain_ms": plain_s * 1e3, "plain_tflops": flops / plain_s / 1e12,
        "matmul_tflops": rate / 1e12, "plain_fraction_of_matmul": flops / plain_s / rate,
        "gram_ms": gram_s * 1e3, "symmetric_ns_ms": sym_ns_s * 1e3, "symmetric_ns_max_abs_diff": sym_diff,
        "xxt_ms": full_s * 1e3, "symmetric_xxt_ms": sym_s * 1e3,
        "symmetric_speedup": full_s / sym_s,
        "symmetric_max_abs_diff": (symmetric_gram(x) - x @ x.mT).abs().max().item(),
        "error_plain": orthogonality_error(g, newton_schulz(g, 5, dtype=bf16, form="plain")),
        "error_gram": orthogonality_error(g, newton_schulz(g, 5, dtype=bf16, form="gram")),
        **{f"rounding_{form}_{k}": rounding_error(v, form)
           for form in ("plain", "gram") for k, v in inputs.items()},
    }


def print_table(rows: list[dict]) -> None:
    kinds = ("gaussian", "graded", "rank8")
    print(f"{'m x n':>12} {'plain ms':>9} {'TFLOP/s':>8} {'of matmul':>9} {'gram ms':>8} {'XXt ms':>7} "
          f"{'sym XXt':>8} {'sym x':>6} {'sym NS ms':>9}  vs UV^T plain/gram; bf16 rounding plain/gram: "
          + ", ".join(kinds))
    for r in rows:
        errors = f"{r['error_plain']:.3f}/{r['error_gram']:.3f}; " + ", ".join(
            f"{r[f'rounding_plain_{k}']:.3f}/{r[f'rounding_gram_{k}']:.3f}" for k in kinds)
        print(f"{r['shape'][0]:>5} x {r['shape'][1]:<5} {r['plain_ms']:>9.2f} {r['plain_tflops']:>8.3f} "
              f"{r['plain_fraction_of_matmul']:>9.2f} {r['gram_ms']:>8.2f} {r['xxt_ms']:>7.2f} "
              f"{r['symmetric_xxt_ms']:>8.2f} {r['symmetric_speedup']:>6.2f} {r['symmetric_ns_ms']:>9.2f}"
              f"  {errors}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="gpt2-small,llama3-8b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-dim", type=int, default=4096, help="skip shapes with m above this")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args()
    device = torch.device(args.device)
    shapes = sorted({ns_key(s) for name in args.models.split(",") for s in model_shapes(name, 1)[0]})
    shapes = [s for s in shapes if s[0] <= args.max_dim]
    rows = [measure_shape(m, n, device, args.repeats) for m, n in shapes]
    print(f"Newton-Schulz kernels, bf16, 5 iterations; device {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print_table(rows)
    machine = {"device": str(device), "torch": torch.__version__, **cpu_machine()}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    save_results(args.json, f"{device.type}-{'+'.join(args.models.split(','))}", args, machine, rows)


if __name__ == "__main__":
    main()
