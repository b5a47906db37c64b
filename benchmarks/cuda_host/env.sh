# Source on the CUDA host (from the repository root). Carried folders (.dev/a, .dev/b, ... from
# bundle.py) do not outlive their call, so they are copied to build/keep (ignored, kept on a
# warm machine); installs the runtime-only TVM and the wheels once; sets the environment.
K=$PWD/build/keep
for d in a b c d; do
  if [ -d .dev/$d ]; then mkdir -p "$K" && rm -rf "$K/$d" && cp -r .dev/$d "$K/$d"; fi
done
B=$K/a
S=$B/site
if [ ! -d "$S/tvm" ]; then
  mkdir -p "$S" && tar -C "$S" -xJf $B/tvm-runtime.tar.xz &&
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$S" $B/wheels/*.whl
fi
# libtvm_runtime_cuda.so needs libcudart.so.13: the toolkit's, or the pip package's.
CR=$(python3 -c "import nvidia.cuda_runtime as m, os; print(os.path.join(list(m.__path__)[0], 'lib'))" 2>/dev/null)
export LD_LIBRARY_PATH=$CR:/usr/local/cuda/lib64:$LD_LIBRARY_PATH
export PYTHONPATH=$S:$PWD TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1
export HETCOMP_KERNEL_CACHE=$K/kcache
