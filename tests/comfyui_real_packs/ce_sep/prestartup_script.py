from comfy_env.comfyui import prestart_pack

prestart_pack(__file__, "nodes", env="comfy-env.toml")
