"""The comparator: the receiver most Python developers would write today for the same job.
FastAPI + uvicorn (2 workers), UploadFile, saved with fsync, top-level keys listed with uproot.

    uvicorn --workers 2 --app-dir benchmarks fastapi_receiver:app --port PORT
"""

import os
import shutil
import uuid

import uproot
from fastapi import FastAPI, File, Header, UploadFile

DATA_DIR = os.environ.get("COMPARATOR_DATA_DIR", "comparator-data")
os.makedirs(DATA_DIR, exist_ok=True)
app = FastAPI()


@app.post("/rest/api/files")
def receive(file: UploadFile = File(...), runNumber: int = Header(...),  # noqa: B008, N803
            timeStamp: int = Header(...), amoreAgent: str = Header("DQM")):  # noqa: B008, N803
    path = os.path.join(DATA_DIR, f"{amoreAgent}histos_{runNumber}_{uuid.uuid4().hex}.root")
    with open(path, "wb") as target:
        shutil.copyfileobj(file.file, target, 1024 * 1024)
        target.flush()
        os.fsync(target.fileno())
    with uproot.open(path) as root_file:
        received = {name: f"Obj name: {name}, Obj IsA() Name: {class_name}"
                    for name, class_name in root_file.classnames(recursive=False,
                                                                 cycle=False).items()}
    return {"status": 200, "filename": os.path.basename(path), "received": received}
