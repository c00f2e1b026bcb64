"""Is jax.lax.ragged_dot native on this backend? Times it against a plain matmul of the same
active FLOPs at 8..128 groups.    python bench/gpu/ragged_probe.py  (writes $OUT or bench/out)
"""
import json, os, time, jax, jax.numpy as jnp
def bench(f, *a, n=20):
    jax.block_until_ready(f(*a)); jax.block_until_ready(f(*a))
    t = time.perf_counter()
    for _ in range(n): r = f(*a)
    jax.block_until_ready(r); return (time.perf_counter() - t) / n
rows = []
M, D, F = 32768, 2048, 1024
for E in (8, 32, 64, 128):
    x = jnp.ones((M, D), jnp.bfloat16); w = jnp.ones((E, D, F), jnp.bfloat16) * 0.01
    gs = jnp.full((E,), M // E, jnp.int32)
    t_r = bench(jax.jit(lambda x, w, g: jax.lax.ragged_dot(x, w, g)), x, w, gs)
    t_d = bench(jax.jit(lambda x, w: x @ w), x, w[0])
    hlo = jax.jit(lambda x, w, g: jax.lax.ragged_dot(x, w, g)).lower(x, w, gs).compile().as_text()
    rows.append(dict(experts=E, ragged_ms=1e3*t_r, matmul_ms=1e3*t_d, ratio=t_r/t_d,
                     tflops_ragged=2*M*D*F/t_r/1e12, custom_call=("custom-call" in hlo or "cublas" in hlo.lower()),
                     hlo_ops=sorted({l.split('=')[1].split('(')[0].strip().split(' ')[-1] for l in hlo.splitlines() if ' = ' in l and '(' in l})[:25]))
    print(rows[-1])
json.dump({"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "rows": rows}, open(os.path.join(os.environ.get("OUT", "bench/out"), "ragged_probe.json"), "w"), indent=1)
