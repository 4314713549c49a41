"""The rule layer: declarative rules mapping one Megatron parameter to regions of HF tensors (rule.py), their
view and combine ops, sharding, the rule groups families combine, and the naming of Megatron's local parameters."""
