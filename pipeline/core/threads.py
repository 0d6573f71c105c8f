"""One BLAS thread pool at work at a time.

numpy and scipy wheels each bring their own OpenBLAS, each with its own threads. A head's L-BFGS alternates
between them: numpy's matrix products, then scipy's L-BFGS-B, whose vector operations run on scipy's OpenBLAS.
An OpenBLAS thread that has finished waits busily for its next task for a while, so on a machine of few cores one
library's idle threads take the cores the other library's threads need. Measured on 2 cores (each head stage as
DVC runs it): the sample's logistic head fitted in 8.6 s with both pools at 2 threads, 0.8 s with scipy's at 1;
the 10^5-row synthetic store's in 34.4 s against 27.1 s. numpy's pool keeps its threads (the large products are
its); every other BLAS library loaded beside it gets one. Where numpy and scipy share one library (conda's MKL or
OpenBLAS), or numpy's cannot be told apart, nothing is changed.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def one_blas_pool() -> list[str]:
    """Give every BLAS library but numpy's one thread; the names of those limited."""
    import numpy
    import scipy.linalg  # noqa: F401 (loads scipy's BLAS, if it has its own)
    from threadpoolctl import ThreadpoolController

    numpy_dirs = {Path(numpy.__file__).parent, Path(numpy.__file__).parent.with_name("numpy.libs")}
    libraries = ThreadpoolController().select(user_api="blas").lib_controllers
    numpys = [lib for lib in libraries if Path(lib.filepath).parent in numpy_dirs]
    if len(libraries) < 2 or not numpys:
        return []
    limited = []
    for lib in libraries:
        if lib not in numpys and lib.num_threads > 1:
            lib.set_num_threads(1)
            limited.append(Path(lib.filepath).name)
    log.debug("BLAS libraries limited to one thread (numpy's keeps its own): %s", limited)
    return limited
