MODELS: dict[str, type] = {}
