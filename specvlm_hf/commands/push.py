"""`specvlm push`: upload a trained draft folder to a Hugging Face Hub repo, with a rendered model card.

    specvlm push runs/draft me/llava-1.5-7b-specvlm-draft --base-model llava-hf/llava-1.5-7b-hf
    specvlm push runs/draft me/my-draft --dry-run         # write README.md into the folder and list the files

Uploads the weights, config, remote code, `custom_generate/`, `eval_results.json` and the card in one commit.
The folder and the token are checked before anything is sent; each request waits at most `--timeout` seconds;
a Hub or connection problem is one line that says what to do.
"""

from __future__ import annotations

from specvlm_hf.hub import DEFAULT_LICENSE, DEFAULT_TIMEOUT


def register(subparsers):
    from .common import positive_float

    parser = subparsers.add_parser(
        "push", help="Upload a trained draft to the Hugging Face Hub.", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("folder", help="Folder written by SpecVLMDraftModel.save_pretrained.")
    parser.add_argument("repo_id", help="Hub repo, 'owner/name' (created if it does not exist).")
    parser.add_argument(
        "--base-model",
        default=None,
        help="Hub id of the target (default: the target name recorded in the draft's config).",
    )
    parser.add_argument(
        "--license", default=DEFAULT_LICENSE, help=f"License id for the card (default: {DEFAULT_LICENSE})."
    )
    parser.add_argument("--private", action="store_true", help="Create the repo private.")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login).")
    parser.add_argument("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or https://huggingface.co).")
    parser.add_argument("--commit-message", default=None, help="Message of the upload commit.")
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=DEFAULT_TIMEOUT,
        help=f"Seconds each Hub request may wait for the server (default {DEFAULT_TIMEOUT:g}).",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="Render the card into FOLDER/README.md and list what would be uploaded; upload nothing.",
    )
    parser.set_defaults(func=_run)


def _run(args):
    from pathlib import Path

    from specvlm_hf.hub import files_to_publish, publish_draft, render_model_card

    if args.dry_run:
        card = render_model_card(args.folder, args.repo_id, base_model=args.base_model, license=args.license)
        (Path(args.folder) / "README.md").write_text(card, encoding="utf-8")
        print(f"Wrote {Path(args.folder) / 'README.md'}. Would upload to {args.repo_id}:")
        for path in [*files_to_publish(args.folder), Path("README.md")]:
            print(f"  {path.as_posix()}")
        return 0
    commit = publish_draft(
        args.folder,
        args.repo_id,
        base_model=args.base_model,
        license=args.license,
        private=args.private,
        token=args.token,
        endpoint=args.endpoint,
        commit_message=args.commit_message,
        timeout=args.timeout,
    )
    print(f"Uploaded {args.folder} to {commit.repo_url.repo_id}: {commit.commit_url}")
    return 0
