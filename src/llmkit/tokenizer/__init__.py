"""llmkit.tokenizer"""
