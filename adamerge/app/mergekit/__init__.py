"""mergekit in and out (arcee-ai/mergekit, its YAML schema as of 0.1.5): ``methods`` is the one
table between adamerge's data-free methods and mergekit's merge methods, ``config`` reads a
mergekit YAML and resolves its settings per tensor, ``recipe`` turns it into an adamerge recipe
(``adamerge merge|fit --from-mergekit``) and ``write`` writes a run's ``mergekit.yaml``.
"""
