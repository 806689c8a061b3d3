# Sourced by scripts/setup.sh and scripts/refresh_lock.sh: how pip builds llama-cpp-python (the gguf-check extra).
# llama-cpp-python ships as source; pip compiles llama.cpp with cmake. CPU only and small: no BLAS, no GPU backends,
# no multimodal library (mtmd), no llama.cpp tools/tests/examples. GGML_NATIVE=OFF compiles for a portable x86-64
# level (SSE4.2, AVX2, FMA, F16C) rather than -march=native, so a .venv built on one machine still runs on another
# of its kind. The exports' check needs correctness, not speed.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"
