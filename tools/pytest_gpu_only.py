"""A pytest plugin that keeps only the GPU tests: those skipped without CUDA and those with `cuda`
in their name. For the lent GPU machine, whose time is short:

    PYTHONPATH=$PWD:$PWD/tools python -m pytest -p pytest_gpu_only -q tests
"""


def pytest_collection_modifyitems(config, items):
    keep = [i for i in items if "cuda" in i.name.lower()
            or any("CUDA" in str(m.kwargs.get("reason", "")) for m in i.iter_markers("skipif"))]
    config.hook.pytest_deselected(items=[i for i in items if i not in keep])
    items[:] = keep
