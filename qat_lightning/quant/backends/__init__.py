"""Optional speed layers (public face). Nothing here is needed for correct results.

* :mod:`.heap`: ``keep_heap`` (glibc heap trimming off; a benchmark flag).
* :mod:`.search_kernels`: C kernels of the histogram searches (``_search_kernels.c``).
* The CPU fake-quant kernels (``_kernels.c``) with :mod:`.overwrite` / :mod:`.qat_weight`.
"""

from qat_lightning.quant.backends.heap import keep_heap

__all__ = ["keep_heap"]
