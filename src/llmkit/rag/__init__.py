"""llmkit.rag"""
