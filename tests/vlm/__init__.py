"""Vision-language LMs on images and video: rows, media and the model family."""
