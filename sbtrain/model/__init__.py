"""Model construction: YAML ModelConfig -> Megatron TransformerConfig + per-layer ModuleSpecs."""
