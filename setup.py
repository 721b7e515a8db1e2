# setuptools needs setup.py for cffi_modules and the agent; all metadata is in pyproject.toml.
from setuptools import Extension, setup

# The agent is a plain shared library that runs inside managed processes
# (LD_PRELOAD); it is built as an extension module only so that setuptools
# compiles and installs it next to the package.  It is never imported.
agent = Extension(
    "uffdio._agent",
    sources=["csrc/agent.c"],
    include_dirs=["csrc"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11",
                        "-fvisibility=hidden"],
    # resolve every symbol at load time: lazy binding would make the agent thread touch
    # the dynamic loader's heap, which is managed memory (see agent.c)
    extra_link_args=["-lpthread", "-ldl", "-Wl,-z,now"],
    py_limited_api=True,
)

setup(cffi_modules=["csrc/build_native.py:ffibuilder"], ext_modules=[agent])
