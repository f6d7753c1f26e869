from setuptools import find_packages, setup

setup(
    name="mpq",
    version="0.1.0",
    description="Mixed-precision quantization search for text-to-image diffusion models (MixDQ-compatible)",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["mpq", "mpq.*"]),
    package_data={
        "mpq": [
            "data/*.txt",
            "models/arch/*.json",
            "models/weights/*.safetensors",
            "models/weights/tiny-sdxl/*.json",
            "models/weights/tiny-sdxl/*/*",
            "models/weights/tiny-sd3/*.json",
            "models/weights/tiny-sd3/*/*",
        ]
    },
    install_requires=[
        "torch>=2.1,<2.14",
        "diffusers>=0.39,<0.43",  # mpq.export.diffusers_hub: the quantizer hooks it uses (0.39), tested to 0.42
        "transformers>=4.44",
        "accelerate>=0.30",
        "safetensors>=0.4",
        "ortools>=9.10",
        "pyyaml>=6",
        "scikit-image>=0.22",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "torchmetrics>=1.3",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "pillow>=10",
        "numpy>=1.26",
        "gguf>=0.17,<0.20",  # ggml's types as weight candidates (mpq.quant.formats.gguf); pure Python
    ],
    extras_require={
        "torchao": ["torchao>=0.14,<0.19"],
        # sdnq: SDNQ's dtypes as weight candidates and `mpq export --format sdnq` (its torch requirement is unpinned:
        # pip keeps the installed torch)
        "sdnq": ["sdnq==0.2.8"],
        "test": ["pytest>=7", "torchao>=0.14,<0.19", "ruff>=0.6", "sdnq==0.2.8"],
        "peers": ["sdnq==0.2.8"],  # benchmarks/bench_peers.py
        # stable-diffusion.cpp's Python binding (a source build: CMake and a C++ compiler, ~15 min on 2 cores), for
        # benchmarks/bench_gguf_sdcpp.py; never needed by the tests
        "runtimes": ["stable-diffusion-cpp-python==0.4.7"],
    },
    entry_points={"console_scripts": ["mpq=mpq.commands.main:main_entry"]},
)
