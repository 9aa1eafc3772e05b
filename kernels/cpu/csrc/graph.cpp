// CPU graphs: a decode forward recorded once as the list of kernel calls it makes (every
// pointer and size fixed, as in a CUDA graph) and replayed by one call from Python, so a
// small decode step pays for its kernels and not for ~300 trips through Python, torch and
// ctypes. kernels/cpu/graph.py records; gpu_worker/cpu_graphs.py owns the static buffers.
//
// An op is a thunk and its arguments in call order, split by class: pointers and integers
// in i[], floating-point ones in f[]. The thunk of a kernel is generated from its declared
// signature (zs_kernels.h), so recording and replay cannot disagree on the order or the
// types; only the kernels in kRecordable can be recorded.

#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "zs_kernels.h"

namespace {

constexpr int kInts = 24, kFloats = 4;

struct ZsOp;
using Thunk = void (*)(const ZsOp*);

struct ZsOp {
    Thunk thunk;
    int64_t i[kInts];
    double f[kFloats];
};

template <typename T>
T take(const ZsOp* op, int& ii, int& fi) {
    if constexpr (std::is_floating_point_v<T>) {
        return static_cast<T>(op->f[fi++]);
    } else if constexpr (std::is_pointer_v<T>) {
        return reinterpret_cast<T>(static_cast<intptr_t>(op->i[ii++]));
    } else {
        return static_cast<T>(op->i[ii++]);
    }
}

template <typename F>
struct Call;

template <typename... A>
struct Call<void (*)(A...)> {
    static_assert(sizeof...(A) <= kInts, "a recordable kernel has more arguments than an op holds");
    template <auto Fn>
    static void run(const ZsOp* op) {
        int ii = 0, fi = 0;
        std::tuple<A...> args{take<A>(op, ii, fi)...};  // a braced list: evaluated left to right
        std::apply(Fn, args);
    }
};

template <auto Fn>
void thunk(const ZsOp* op) {
    Call<decltype(Fn)>::template run<Fn>(op);
}

struct Entry {
    const char* name;
    Thunk fn;
};

#define ZS_RECORDABLE(name) {#name, &thunk<&name>}
const Entry kRecordable[] = {
    ZS_RECORDABLE(zs_paged_attention), ZS_RECORDABLE(zs_rms_norm),    ZS_RECORDABLE(zs_rotary),
    ZS_RECORDABLE(zs_write_kv),        ZS_RECORDABLE(zs_silu_and_mul), ZS_RECORDABLE(zs_gather_rows),
    ZS_RECORDABLE(zs_argmax_rows),     ZS_RECORDABLE(zs_linear),       ZS_RECORDABLE(zs_gguf_linear),
    ZS_RECORDABLE(zs_gguf_rows),       ZS_RECORDABLE(zs_i8_linear),    ZS_RECORDABLE(zs_bf16_linear),
};
#undef ZS_RECORDABLE

}  // namespace

extern "C" {

// The thunk of kernel `name` (an address for ZsOp.thunk), 0 if it cannot be recorded.
int64_t zs_graph_thunk(const char* name) {
    for (const Entry& e : kRecordable)
        if (std::strcmp(e.name, name) == 0) return static_cast<int64_t>(reinterpret_cast<intptr_t>(e.fn));
    return 0;
}

// The layout of an op, for the recorder to check against its own: bytes, ints, floats.
void zs_graph_layout(int64_t* out) {
    out[0] = sizeof(ZsOp);
    out[1] = kInts;
    out[2] = kFloats;
}

// Replay: ops[0] .. ops[n - 1], in order, on the calling thread (each kernel uses the
// OpenMP pool as it does when called from Python).
void zs_graph_run(const ZsOp* ops, int64_t n) {
    for (int64_t k = 0; k < n; ++k) ops[k].thunk(&ops[k]);
}

}  // extern "C"
