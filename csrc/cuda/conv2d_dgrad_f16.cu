// Conv2d input gradient, the half instance (conv2d_dgrad.cu calls it): a file of its own
// so that nvcc compiles it beside the others.
#include "conv2d.cuh"

namespace fastlayers::cuda {

template FL_CONV_DGRAD_INSTANCE(__half);

}  // namespace fastlayers::cuda
