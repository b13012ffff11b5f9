// Prints the NCCL and cuBLAS versions this binary was compiled against and the ones it runs with.
//
// Its first job is to make the CUDA compile check compile csrc/common/nccl_check.h and
// csrc/common/cublas_check.h with nvcc (tools/cuda_compile_check.sh): CMake builds it as an OBJECT
// library, which needs only the headers, and links it into the `tpext_print_lib_versions` executable
// only where libnccl and libcublas are found too. Run there, a header/library version mismatch (the
// usual cause of "undefined symbol" or odd NCCL behaviour in an extension) shows at a glance.
#include "common/cublas_check.h"
#include "common/cuda_check.h"
#include "common/nccl_check.h"

#include <cstdio>
#include <exception>

int main() {
  try {
    int nccl = 0;
    TPEXT_NCCL_CHECK(ncclGetVersion(&nccl));
    int major = 0, minor = 0, patch = 0;
    TPEXT_CUBLAS_CHECK(cublasGetProperty(MAJOR_VERSION, &major));
    TPEXT_CUBLAS_CHECK(cublasGetProperty(MINOR_VERSION, &minor));
    TPEXT_CUBLAS_CHECK(cublasGetProperty(PATCH_LEVEL, &patch));
    int runtime = 0;
    TPEXT_CUDA_CHECK(cudaRuntimeGetVersion(&runtime));
    std::printf("NCCL   headers %d.%d.%d, library %d (code)\n", NCCL_MAJOR, NCCL_MINOR, NCCL_PATCH, nccl);
    std::printf("cuBLAS headers %d, library %d.%d.%d\n", CUBLAS_VERSION, major, minor, patch);
    std::printf("CUDA   runtime %d\n", runtime);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tpext_print_lib_versions: %s\n", e.what());
    return 1;
  }
}
