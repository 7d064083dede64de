"""The data engine: annotate image collections at scale (``segany engine``).

Modules: :mod:`.sources` (which images, where outputs go), :mod:`.annotate` (the per-image
work shared by both runners), :mod:`.local_runner` (in this process), :mod:`.ray_runner`
(Ray Data, on one machine or a cluster; Ray is imported only there), :mod:`.auto` (the
driver: resumable runs, failures, summary), :mod:`.propose` (proposals for missing
annotations) and :mod:`.retrain` (fine-tuning on accepted annotations).
"""
