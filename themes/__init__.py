"""llmconsole.themes"""
