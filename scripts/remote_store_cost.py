"""Does a kernel that writes to a peer GPU finish later than one that writes locally?

    python scripts/remote_store_cost.py        (one process, GPUs 0 and 1, peer access)

The fused kernel pushes its partial sums into the peers' memory and then waits for theirs.
If a grid counts as complete only once its remote writes are acknowledged (a round trip
over NVLink, about twice the one-way latency), that acknowledgement, not the peer's
value, may end each call at decode sizes. Each variant below is 8 launches of one block
captured in a CUDA graph, timed by replay (median of 200, per launch); "spin N" makes the
kernel wait N ns (GPU clock) after its store, to see whether waiting hides the cost.
"""
from __future__ import annotations

import sys

import numpy as np

SOURCE = r"""
__device__ __forceinline__ unsigned long long now_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ void spin(long long ns) {
  const unsigned long long start = now_ns();
  while ((long long)(now_ns() - start) < ns) {}
}
extern "C" __global__ void nothing(unsigned long long* dst, long long ns) { spin(ns); }
extern "C" __global__ void store(unsigned long long* dst, long long ns) {
  if (threadIdx.x == 0)
    asm volatile("st.volatile.global.u64 [%0], %1;" ::"l"(dst), "l"(1ull) : "memory");
  spin(ns);
}
extern "C" __global__ void load(unsigned long long* src, long long ns) {
  unsigned long long v = 0;
  if (threadIdx.x == 0)
    asm volatile("ld.volatile.global.u64 %0, [%1];" : "=l"(v) : "l"(src) : "memory");
  spin(ns + (long long)(v & 1ull));
}
"""

LAUNCHES = 8


def per_launch_us(kernel, ptr, ns, stream):
    import cupy
    args = (np.uint64(ptr), np.int64(ns))
    with stream:
        kernel((1,), (32,), args)
        stream.synchronize()
        stream.begin_capture()
        for _ in range(LAUNCHES):
            kernel((1,), (32,), args)
        graph = stream.end_capture()
        graph.launch(stream)
        times = []
        for _ in range(200):
            a, b = cupy.cuda.Event(), cupy.cuda.Event()
            a.record(stream)
            graph.launch(stream)
            b.record(stream)
            b.synchronize()
            times.append(cupy.cuda.get_elapsed_time(a, b))
    return 1000 * float(np.median(times)) / LAUNCHES


def main():
    import cupy
    from cupy.cuda import runtime
    if runtime.getDeviceCount() < 2:
        print("needs two GPUs", file=sys.stderr)
        return 2
    with cupy.cuda.Device(1):
        remote = cupy.zeros(64, cupy.uint64)
    with cupy.cuda.Device(0):
        if not runtime.deviceCanAccessPeer(0, 1):
            print("GPU 0 cannot reach GPU 1 as a peer", file=sys.stderr)
            return 2
        runtime.deviceEnablePeerAccess(1)
        local = cupy.zeros(64, cupy.uint64)
        mod = cupy.RawModule(code=SOURCE, options=("-std=c++17",))
        k = {name: mod.get_function(name) for name in ("nothing", "store", "load")}
        stream = cupy.cuda.Stream(non_blocking=True)
        name = runtime.getDeviceProperties(0)["name"].decode()
        print(f"{name}: us per launch, graph of {LAUNCHES}, median of 200 replays")
        print("| spin ns | nothing | local store | remote store | remote load |")
        print("| --- | --- | --- | --- | --- |")
        for ns in (0, 500, 1000, 1500, 2000):
            row = [per_launch_us(k["nothing"], local.data.ptr, ns, stream),
                   per_launch_us(k["store"], local.data.ptr, ns, stream),
                   per_launch_us(k["store"], remote.data.ptr, ns, stream),
                   per_launch_us(k["load"], remote.data.ptr, ns, stream)]
            print(f"| {ns} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
        assert int(remote[0].get()) == 1, "the remote store never landed"
    return 0


if __name__ == "__main__":
    sys.exit(main())
