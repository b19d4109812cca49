"""The pure decisions, on data already in memory: the domain and its errors, the settings, which
model a study is for (routing, anatomy, input profile), how its pixels become a model's input
(decoding, preprocessing), scoring and its evidence (models, inference, explain, triage), the
priority policy, CDS cards and the statistics of an evaluation. Nothing here talks to a server,
imports Flask or the job store: tests/test_architecture.py checks it."""
