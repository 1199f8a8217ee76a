"""Loaded at the start of every Python process the tests start when LUNGKIT_TEST_CPU_WITHOUT_BF16=1 (conftest puts
this folder on PYTHONPATH): the CLI subprocesses see the same CPU without bf16 units as the test process."""

import os

if os.environ.get("LUNGKIT_TEST_CPU_WITHOUT_BF16") == "1":
    import lungmask_kit.runtime

    lungmask_kit.runtime.cpu_has_bf16 = lambda: False
