"""Build script: two pure-Python packages plus an optional CUDA extension (csrc/).

The extension switch_dit_kernels._C (the expert permutation kernels) is built with CMake (or nvcc
directly when CMake is missing) only when nvcc is found; without it, or when its build fails,
the install goes on without it (a warning is printed) and backend="cuda" says how to build it.
    pip install -e .                      # editable: the module lands in switch_dit_kernels/
    python setup.py build_ext --inplace   # rebuild in place while developing

Build knobs (environment variables):
    SWITCH_DIT_BUILD_CUDA=0        never build the extension
    SWITCH_DIT_BUILD_CUDA=1        build it and fail the install if that fails (default: build
                                   when nvcc is found, warn and go on if the build fails)
    SWITCH_DIT_CUDA_ARCHS="80;90"  CUDA architectures (default: the local GPUs' via nvidia-smi,
                                   else "80;90"; no GPU is queried through torch at build time)
    CUDA_HOME / CUDA_PATH          where to look for nvcc when it is not on PATH
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_nvcc():
    """Path of nvcc (PATH, then $CUDA_HOME, $CUDA_PATH, /usr/local/cuda) or None."""
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


def cuda_build_mode():
    """"off", "force" (SWITCH_DIT_BUILD_CUDA=1) or "auto" (build when nvcc is found)."""
    flag = os.environ.get("SWITCH_DIT_BUILD_CUDA", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return "off"
    if flag in ("1", "true", "yes", "on"):
        return "force"
    return "auto"


def default_archs():
    """SWITCH_DIT_CUDA_ARCHS, else the local GPUs' compute capabilities, else "80;90"."""
    env = os.environ.get("SWITCH_DIT_CUDA_ARCHS", "").strip()
    if env:
        return env
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
            caps = sorted({c.strip().replace(".", "") for c in out.split() if c.strip()})
            if caps and all(c.isdigit() for c in caps):
                return ";".join(caps)
        except (OSError, subprocess.SubprocessError):
            pass
    return "80;90"


class CMakeExtension(Extension):
    """An extension built by CMakeLists.txt rather than by setuptools' compiler."""

    def __init__(self, name):
        super().__init__(name, sources=[], optional=True)


class BuildExt(build_ext):
    """build_ext that runs CMake for the CUDA extension and never fails the install by default."""

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        try:
            self._build_cuda(ext)
        except Exception as exc:  # any failure: compiler, CMake, pybind11 missing, ...
            if cuda_build_mode() == "force":
                raise RuntimeError(f"SWITCH_DIT_BUILD_CUDA=1 and building {ext.name} failed: "
                                   f"{exc}") from exc
            print(f"\nWARNING: building the optional CUDA extension {ext.name} failed ({exc}); "
                  "installing without it (backend='cuda' will be unavailable). Set "
                  "SWITCH_DIT_BUILD_CUDA=1 to make this an error, 0 to skip the build.\n",
                  file=sys.stderr)

    def _build_cuda(self, ext):
        nvcc = find_nvcc()
        if nvcc is None:
            raise RuntimeError("nvcc not found")
        import pybind11  # a build requirement (pyproject.toml)

        # pip shows this only with -v (the Makefile prints its own line); `setup.py build_ext`
        # always shows it. The build takes about 30 s (nvcc for two architectures), GPU or not.
        print(f"switch-dit: building the optional CUDA extension {ext.name} with {nvcc} "
              f"(about 30 s; SWITCH_DIT_BUILD_CUDA=0 skips it)", file=sys.stderr, flush=True)

        target = os.path.abspath(self.get_ext_fullpath(ext.name))
        staging = os.path.join(os.path.abspath(self.build_temp), "switch_dit_cuda")
        lib_dir = os.path.join(staging, "lib")
        os.makedirs(lib_dir, exist_ok=True)
        for old in glob.glob(os.path.join(lib_dir, "_C*")):
            os.remove(old)
        cmake = shutil.which("cmake")
        if cmake:
            self._run_cmake(cmake, nvcc, pybind11.get_cmake_dir(), staging, lib_dir)
        else:
            self._run_nvcc(nvcc, pybind11.get_include(), staging, lib_dir)
        built = glob.glob(os.path.join(lib_dir, "_C*.so")) + glob.glob(os.path.join(lib_dir, "_C*.pyd"))
        if len(built) != 1:
            raise RuntimeError(f"expected one _C module in {lib_dir}, found {built}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(built[0], target)

    def _run_cmake(self, cmake, nvcc, pybind11_dir, staging, lib_dir):
        build_dir = os.path.join(staging, "cmake")
        configure = [cmake, "-S", ROOT, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
                     f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DPython_EXECUTABLE={sys.executable}",
                     f"-Dpybind11_DIR={pybind11_dir}", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={lib_dir}"]
        archs = os.environ.get("SWITCH_DIT_CUDA_ARCHS", "").strip()
        # Pass the knob explicitly (or clear a value cached by an earlier configure).
        configure.append(f"-DSWITCH_DIT_CUDA_ARCHS={archs}" if archs else "-USWITCH_DIT_CUDA_ARCHS")
        cached = os.path.join(build_dir, "CMakeCache.txt")
        if (not os.path.exists(cached) and shutil.which("ninja")
                and not os.environ.get("CMAKE_GENERATOR")):
            configure += ["-G", "Ninja"]
        subprocess.check_call(configure)
        subprocess.check_call([cmake, "--build", build_dir, "--parallel", str(os.cpu_count() or 2)])

    def _run_nvcc(self, nvcc, pybind11_include, staging, lib_dir):
        """No CMake: one nvcc command with the same flags (static CUDA runtime, no libtorch)."""
        archs = [a.replace(".", "").replace("+PTX", "")
                 for a in default_archs().replace(",", ";").replace(" ", ";").split(";") if a]
        archs = sorted(set(archs), key=lambda a: int("".join(c for c in a if c.isdigit())))
        gencode = []
        for i, arch in enumerate(archs):
            codes = f"sm_{arch}" + (f",compute_{arch}" if i == len(archs) - 1 else "")
            gencode.append(f"-gencode=arch=compute_{arch},code=[{codes}]")
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        cmd = [nvcc, "-O3", "-std=c++17", "-shared", "-cudart", "static", "-lineinfo",
               "-Xcompiler", "-fPIC,-fvisibility=hidden", f"-I{os.path.join(ROOT, 'csrc')}",
               f"-I{pybind11_include}", f"-I{sysconfig.get_paths()['include']}",
               f"-DSDK_CUDA_ARCHS=\"{','.join(archs)}\"", *gencode,
               os.path.join(ROOT, "csrc", "permute_kernels.cu"),
               os.path.join(ROOT, "csrc", "bindings.cpp"),
               "-o", os.path.join(lib_dir, "_C" + suffix)]
        subprocess.check_call(cmd, cwd=staging)


def cuda_extensions():
    """[the CUDA extension] when it should be built, else []."""
    mode = cuda_build_mode()
    if mode == "off":
        return []
    if find_nvcc() is None:
        if mode == "force":
            raise RuntimeError("SWITCH_DIT_BUILD_CUDA=1 but nvcc was not found (PATH, CUDA_HOME, "
                               "CUDA_PATH, /usr/local/cuda)")
        print("switch-dit: no nvcc found, installing without the optional CUDA extension",
              file=sys.stderr)
        return []
    return [CMakeExtension("switch_dit_kernels._C")]


setup(
    name="switch-dit",
    version="0.1.0",
    description="Switch Diffusion Transformer with fused Mixture-of-Experts kernels",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["switch_dit_kernels*", "switch_dit*", "benchmarks*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "scipy", "einops", "tqdm", "pillow", "scikit-learn",
                      "matplotlib"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest", "pytest-xdist", "pytest-benchmark", "hypothesis", "triton>=3.2", "ninja",
                 "pybind11", "transformers>=5"],
        "transformers": ["transformers>=5"],
        "fid": ["torch-fidelity", "clean-fid"],
        "latents": ["diffusers"],
    },
    ext_modules=cuda_extensions(),
    cmdclass={"build_ext": BuildExt},
    entry_points={"console_scripts": [
        "switch-dit-train=switch_dit.train:main",
        "switch-dit-sample=switch_dit.sample:main",
        "switch-dit-evaluate=switch_dit.evaluate:main",
        "switch-dit-encode-latents=switch_dit.encode_latents:main",
        "switch-dit-demo=switch_dit.demo:main",
    ]},
)
