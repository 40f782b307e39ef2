from setuptools import setup

setup(
    name="matekd-ds",
    version="0.1.0",
    description="MATE-KD (Masked Adversarial TExt knowledge distillation) on DeepSpeed",
    python_requires=">=3.10",
    packages=[
        "matekd_ds", "matekd_ds.data", "matekd_ds.methods", "matekd_ds.configs",
        "matekd_ds.kernels", "matekd_ds.ds_configs", "matekd_ds.experiment",
    ],
    # The Triton kernels live in kernels/ and the DeepSpeed presets in ds_configs/ at the top of
    # the repository, but install inside matekd_ds: a top-level `kernels` package would shadow
    # Hugging Face's `kernels` distribution, which transformers imports.
    package_dir={"matekd_ds.kernels": "kernels", "matekd_ds.ds_configs": "ds_configs"},
    package_data={"matekd_ds.configs": ["*.yaml"], "matekd_ds.ds_configs": ["*.json", "*.md"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.45",
        "tokenizers>=0.20",
        "datasets>=3.0",
        "numpy",
        "scipy",
        "pyyaml",
        "tqdm",
        "tensorboard",
    ],
    extras_require={
        "triton": ["triton>=3.6,<3.10"],
        "test": ["pytest>=8", "triton>=3.6,<3.10", "scipy", "ruff==0.17.6", "onnx>=1.16", "onnxruntime>=1.18"],
        "bench": ["matplotlib"],
        "onnx": ["onnx>=1.16", "onnxruntime>=1.18"],  # `matekd export --onnx`
    },
    entry_points={"console_scripts": ["matekd=matekd_ds.cli:main"]},
)
