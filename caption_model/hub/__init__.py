"""Publishing to the Hugging Face Hub: the model card, pre-publish checks, the upload, the demo Space bundle.

    caption_model.hub.card     render_model_card / build_model_card: the one model card source
    caption_model.hub.checks   check_checkpoint, smoke_test, CheckpointError
    caption_model.hub.publish  publish, dry_run, PublishError (what push_to_hub.py runs)
    caption_model.hub.space    stage_space_folder: the Space bundle (serving code only)

Submodules are imported by name, never from here: the model imports hub.card, and hub.publish imports the model.
"""
