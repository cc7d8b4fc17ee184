"""Chip profiles for the roofline: peak dense throughput per compute dtype and memory bandwidth.

Figures are vendor peaks *without* structured sparsity (datasheets that quote "with sparsity"
are halved). They are upper bounds: real kernels reach a fraction of them, which the roofline's
validation benchmark measures (benchmarks/results/roofline.jsonl) rather than assumes.

Sources:
* H100 SXM5: NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100):
  BF16/FP16 1,979 TFLOPS and FP8/INT8 3,958 with sparsity, FP32 67 TFLOPS; HBM3 3.35 TB/s.
* H200 SXM: NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): the H100's compute;
  HBM3e 4.8 TB/s, 141 GB.
* A100 SXM4 80GB: NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100): BF16 312 TFLOPS,
  INT8 624 TOPS, FP32 19.5 TFLOPS; 2,039 GB/s. No FP8 tensor cores.
* L4: NVIDIA L4 datasheet (nvidia.com/en-us/data-center/l4): BF16 242 and FP8/INT8 485 with
  sparsity, FP32 30.3 TFLOPS; GDDR6 300 GB/s.
* RTX 4090: NVIDIA Ada Lovelace architecture whitepaper (v2.1), appendix table: FP16/BF16 tensor
  with FP32 accumulate 165.2 TFLOPS, FP8 with FP32 accumulate 330.3, INT8 660.6 TOPS, FP32 82.6;
  GDDR6X 1,008 GB/s.
* Apple M2 (10-core GPU): Apple M2 press release (June 2022): 3.6 TFLOPS GPU, 100 GB/s unified
  memory, 15.8 TOPS Neural Engine. The GPU's FP16 rate is taken equal to FP32 (no separate
  figure published); int8 runs on the Neural Engine.
* Measured ceilings (``h100-measured``, ``h200-measured``): this workplace's device notes
  (KINDS.md, 2026-10/11), a large device-to-device copy (bytes read plus written) and an
  8192^3 bf16 matrix product on random data: H100 3.0 TB/s and 798 TFLOP/s, H200 4.3 TB/s and
  788 TFLOP/s. Other dtypes are scaled by the same fraction of their peak as bf16 reached (an
  assumption until each is measured).
* Mobile NPU (Apple A17 Pro class): Apple A17 Pro press release (Sept 2023): Neural Engine 35 TOPS
  (int8). Memory: LPDDR5-6400 on a 64-bit bus, 51.2 GB/s, derived from the memory type (Apple
  publishes no figure); fp16 at half the int8 rate, an assumption marked here.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimtorch.errors import SlimError

TERA = 1e12


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: dict[str, float]  # compute dtype -> dense FLOP/s (or OP/s for int8)
    mem_bandwidth: float  # bytes/s
    memory_bytes: float
    source: str

    def peak(self, compute: str) -> float:
        """Peak for a compute dtype, falling back to the fastest slower format the chip has (fp8 -> bf16)."""
        for dtype in _FALLBACK[compute]:
            if dtype in self.peak_flops:
                return self.peak_flops[dtype]
        raise SlimError(f"{self.name} has no figure for {compute} compute")


# a chip without a format runs it in the next wider one (int4 weights are dequantized to bf16 anyway)
_FALLBACK = {"fp32": ("fp32",), "bf16": ("bf16", "fp32"), "fp8": ("fp8", "bf16", "fp32"),
             "int8": ("int8", "bf16", "fp32")}

_HOPPER = {"bf16": 989.4 * TERA, "fp8": 1978.9 * TERA, "int8": 1978.9 * TERA, "fp32": 66.9 * TERA}

HARDWARE: dict[str, Hardware] = {
    h.name: h for h in (
        Hardware("h100", _HOPPER, 3.35e12, 80e9, "NVIDIA H100 SXM5 datasheet"),
        Hardware("h200", _HOPPER, 4.8e12, 141e9, "NVIDIA H200 SXM datasheet"),  # the H100's compute
        Hardware("a100", {"bf16": 312 * TERA, "int8": 624 * TERA, "fp32": 19.5 * TERA},
                 2.039e12, 80e9, "NVIDIA A100 SXM4 80GB datasheet"),
        Hardware("l4", {"bf16": 121 * TERA, "fp8": 242.5 * TERA, "int8": 242.5 * TERA, "fp32": 30.3 * TERA},
                 300e9, 24e9, "NVIDIA L4 datasheet"),
        Hardware("rtx4090", {"bf16": 165.2 * TERA, "fp8": 330.3 * TERA, "int8": 660.6 * TERA, "fp32": 82.6 * TERA},
                 1.008e12, 24e9, "NVIDIA Ada Lovelace whitepaper"),
        Hardware("m2", {"bf16": 3.6 * TERA, "fp32": 3.6 * TERA, "int8": 15.8 * TERA},
                 100e9, 24e9, "Apple M2 press release"),
        Hardware("mobile-npu", {"int8": 35 * TERA, "bf16": 17.5 * TERA},
                 51.2e9, 8e9, "Apple A17 Pro press release; bandwidth derived"),
    )
}


def measured(hw: Hardware, name: str, bf16_flops: float, bandwidth: float, source: str) -> Hardware:
    """``hw`` with measured ceilings: bandwidth as measured, every peak scaled by bf16's measured fraction."""
    frac = bf16_flops / hw.peak_flops["bf16"]
    return Hardware(name, {k: v * frac for k, v in hw.peak_flops.items()}, bandwidth, hw.memory_bytes, source)


HARDWARE["h100-measured"] = measured(HARDWARE["h100"], "h100-measured", 798 * TERA, 3.0e12,
                                     "measured here: copy 3.0 TB/s, bf16 GEMM 798 TFLOP/s")
HARDWARE["h200-measured"] = measured(HARDWARE["h200"], "h200-measured", 788 * TERA, 4.3e12,
                                     "measured here: copy 4.3 TB/s, bf16 GEMM 788 TFLOP/s")


def get_hardware(name: str) -> Hardware:
    key = name.lower().replace("_", "-")
    if key not in HARDWARE:
        raise SlimError(f"unknown hardware {name!r}; choose one of: {', '.join(HARDWARE)}")
    return HARDWARE[key]
