"""Build the TEMPO trainer: the `tempo` package, the `kernels/` folder installed as
`tempo_kernels` (the name `kernels` belongs to a Hugging Face package that transformers
probes), and the C++ vote-aggregation extension from `csrc/`.

Install with `pip install --no-build-isolation -e .` so the extension builds against the
torch already in the environment (an isolated build would download a CUDA torch).
"""
import glob
import os

from setuptools import find_packages, setup


def vote_extension():
    """The csrc/ vote-aggregation extension: C++/OpenMP always, CUDA when torch has CUDA."""
    sources = sorted(glob.glob("csrc/*.cpp"))
    if not sources or os.environ.get("TEMPO_NO_EXT") == "1":
        return [], {}
    from torch.utils import cpp_extension

    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    use_cuda = cpp_extension.CUDA_HOME is not None and __import__("torch").version.cuda is not None
    cxx = ["-O3", "-fopenmp", "-std=c++20"]
    if use_cuda and cuda_sources:
        ext = cpp_extension.CUDAExtension(
            "tempo._vote_ext",
            sources + cuda_sources,
            define_macros=[("TEMPO_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "tempo._vote_ext", sources, extra_compile_args=cxx, extra_link_args=["-fopenmp"]
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = vote_extension()

setup(
    name="tempo-trainer",
    version="0.1.0",
    description="TEMPO: test-time training of reasoning models by Expectation-Maximisation",
    python_requires=">=3.10",
    packages=find_packages(include=["tempo", "tempo.*"]) + ["tempo_kernels"],
    package_dir={"tempo_kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.56",
        "safetensors",
        "numpy",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "math-verify>=0.7",
    ],
    extras_require={
        "triton": ["triton"],
        "megatron": ["megatron-core>=0.16"],
        # vllm 0.32.0 pins torch 2.13.0 (the CPU install's too: it stays) and transformers <5.20
        "gpu": ["vllm==0.32.0", "liger-kernel"],
        "flash": ["flash-attn"],  # model.attn_implementation=flash_attention_2; builds against CUDA
        "test": ["pytest", "pytest-benchmark"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["tempo=tempo.cli:main"]},
)
