"""llmkit.model"""
