"""mmkit-plugin-audio-example: the example third-party mmkit plugin (WAV audio through Whisper).

Kept empty on purpose: mmkit imports ``mmkit_plugin_audio_example.plugin`` at start-up, and
Python imports this package first, so anything here would slow every ``mmkit`` command.
"""
