// trigfarm batched bridge: runs the hls4ml top function over a contiguous batch of events.
//
// Compiled with g++ against the project hls4ml wrote (firmware/@PROJECT@.cpp). Each event
// goes through the same float -> input_t -> top function -> result_t -> float path as
// hls4ml's own @PROJECT@_float() bridge, so the outputs are bit-identical to predict();
// only the per-event Python round trip is gone.
#include "firmware/@PROJECT@.h"
#include "firmware/nnet_utils/nnet_helpers.h"

#include <map>
#include <string>

namespace nnet {
bool trace_enabled = false;
std::map<std::string, void *> *trace_outputs = NULL;
size_t trace_type_size = sizeof(double);
} // namespace nnet

extern "C" {

int trigfarm_n_inputs() { return @N_IN@; }

int trigfarm_n_outputs() { return @N_OUT@; }

// in: n x @N_IN@ floats (row-major); out: n x @N_OUT@ floats. Events are independent, so
// n_threads > 1 splits them over OpenMP threads without changing any bit. Returns n.
long trigfarm_predict_batch(const float *in, float *out, long n, int n_threads) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) schedule(static)
#endif
    for (long e = 0; e < n; ++e) {
        float x_float[@N_IN@];
        for (int i = 0; i < @N_IN@; ++i)
            x_float[i] = in[e * @N_IN@ + i];
        @IN_T@ x[@N_IN@];
        nnet::convert_data<float, @IN_T@, @N_IN@>(x_float, x);
        @OUT_T@ y[@N_OUT@];
        @PROJECT@(x, y);
        nnet::convert_data<@OUT_T@, float, @N_OUT@>(y, out + e * @N_OUT@);
    }
    return n;
}
}
