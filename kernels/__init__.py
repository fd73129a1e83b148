"""llmconsole.kernels"""
