"""Parallel glue: process groups, data sharding over DP, model-state initialisation."""
