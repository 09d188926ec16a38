"""bench's figures read out: the ratios the goals are stated in, and the printed table."""

from __future__ import annotations

from typing import Any

# The "network alone" figures that match what the service runs, by (backend, precision, compiled).
NETWORK_OF_SERVICE = {
    ("torch", "float32", False): "network_default",
    ("torch", "float32", True): "network_default_compiled",
    ("torch", "bfloat16", False): "network_default_bfloat16",
    ("torch", "bfloat16", True): "network_default_bfloat16_compiled",
    ("torch", "float16", False): "network_default_float16",
    ("onnxruntime", "float32", False): "network_default_onnxruntime",
}


def ratios(result: dict[str, Any]) -> dict[str, float]:
    """The figures the issue's goals are stated in, each from this run's own references: the network alone is
    measured as the service runs it (backend, precision, compiled), against the matmul ceiling in that precision."""
    service = result["service"]
    network = result[NETWORK_OF_SERVICE[service["backend"], service["precision"], service["compiled"]]]
    best = network["batches"][network["best_batch"]]
    e2e = result["latency"]["json/resize"]
    stages = e2e["stages_ms"]
    on = result["throughput_default"]
    levels = sorted({16 if 16 in on else max(on), max(on)})
    memory = result["memory"]
    gpu_memory = {"gpu_memory_growth_50_to_last": memory["gpu_growth"]} if "gpu_growth" in memory else {}
    return {
        "e2e_p50_over_network_batch1": e2e["p50_ms"] / network["batches"][1]["ms_per_image"],
        "non_network_share_of_e2e": 1 - stages["network"] / e2e["p50_ms"],
        **{f"throughput_c{c}_over_best_network": on[c]["images_per_s"] / best["images_per_s"] for c in levels},
        **{f"gpu_busy_share_c{c}": on[c]["gpu_busy_share"] for c in levels if "gpu_busy_share" in on[c]},
        "network_best_of_matmul_ceiling": best["of_matmul_ceiling"],
        "memory_growth_50_to_last": memory["growth"],
        **gpu_memory,
        "errors": sum(v["errors"] for k in ("throughput_default", "throughput_batch_8") for v in result[k].values()),
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"model {result['model']}, torch {result['machine']['torch']}, {result['machine']['device']}, "
        f"{result['machine']['threads']} threads, "
        f"service: {result['service']['workers']} worker(s), {result['service']['backend']} in "
        f"{result['service']['precision']}" + (", compiled" if result["service"]["compiled"] else ""),
        f"matmul ceiling                      {result['matmul_gflops']:8.1f} GFLOP/s",
    ]
    for precision in ("tf32", "bfloat16", "float16"):
        if f"matmul_gflops_{precision}" in result:
            lines.append(f"matmul ceiling, {precision:<19} {result[f'matmul_gflops_{precision}']:8.1f} GFLOP/s")
    for name in (n for n in result if n.startswith("network_")):
        section = result[name]
        for batch, row in section["batches"].items():
            lines.append(
                f"{name} {section['input']}px batch {batch:<3} {row['ms_per_image']:8.1f} ms/img "
                f"{row['gflops']:7.1f} GFLOP/s ({row['of_matmul_ceiling']:.0%} of matmul)"
            )
    if "reference" in result:
        ref = result["reference"]
        here = result["network_paper_572_float16"]["resident_batch_16_images_per_s"]
        lines.append(
            f"published: {ref['network']} on {ref['gpu']}, {ref['precision']}, batch {ref['batch']}: "
            f"{ref['images_per_s']} img/s; here on {result['machine']['device']}: {here:.1f} img/s (batch in GPU "
            "memory; network_paper_572_float16 above with the copies)"
        )
    lines.append(f"rle encode 400 cells                {result['rle']['encode_400_cells_520x704_ms']:8.2f} ms")
    step = result["instance_step"]
    lines.append(
        f"instance step, {step['cells']} cells: reference on the CPU {step['reference_on_cpu_ms']:.1f} ms, torch on "
        f"{result['machine']['device']} {step['torch_on_device_ms']:.1f} ms ({step['torch_tensor_operations']} "
        "tensor operations)"
    )
    for key, row in result["latency"].items():
        lines.append(
            f"e2e c=1 {key:<16} p50 {row['p50_ms']:7.1f}  p95 {row['p95_ms']:7.1f}  p99 {row['p99_ms']:7.1f} ms"
        )
        if "stages_ms" in row:
            lines.append("        stages ms: " + ", ".join(f"{k} {v:.1f}" for k, v in row["stages_ms"].items()))
    for name in ("throughput_default", "throughput_batch_8"):
        for concurrency, row in result[name].items():
            busy = f"  GPU busy {row['gpu_busy_share']:.0%}" if "gpu_busy_share" in row else ""
            lines.append(
                f"{name:<24} c={concurrency:<3} {row['images_per_s']:6.2f} img/s  p50 {row['p50_ms']:8.1f} ms"
                f"  errors {row['errors']}{busy}"
            )
    memory = result["memory"]
    lines.append(
        "memory MiB: " + ", ".join(f"{k} {v:.1f}" if "mib" in k else f"{k} {v:+.2%}" for k, v in memory.items())
    )
    lines.append("ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in result["ratios"].items()))
    return "\n".join(lines)
