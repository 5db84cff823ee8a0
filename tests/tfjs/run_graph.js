// Reference runner: a TensorFlow.js graph model executed by TensorFlow.js itself (the pure-JS "cpu" backend of
// @tensorflow/tfjs, no native binary), for parity tests of iddm_core/face/tfjs_graph.py.
//
//   node run_graph.js request.json
//
// request.json: {"model": "/abs/model.json",
//                "inputs": {"<placeholder>": {"file": "/abs/x.bin", "shape": [1, 112, 112, 3]}},
//                "outputs": ["node/name", ...],
//                "out_dir": "/abs/dir"}
// Input files are raw little-endian float32. For each output i the script writes out_dir/out<i>.bin (float32)
// and out_dir/result.json = {"outputs": [{"name": ..., "shape": [...], "file": ...}], "backend": "cpu",
// "version": "<tfjs version>"}.
// @tensorflow/tfjs is looked up in $TFJS_NODE_MODULES (a node_modules folder), then next to this script.
'use strict';

const fs = require('fs');
const path = require('path');

function loadTf() {
  const roots = [process.env.TFJS_NODE_MODULES, path.join(__dirname, '..', '.tfjs_cache', 'node_modules')]
    .filter(Boolean);
  const resolved = require.resolve('@tensorflow/tfjs', { paths: roots });
  return require(resolved);
}

// An IOHandler that reads model.json and its shards from disk (tf.io.http would need fetch and a server).
function fileHandler(modelPath) {
  return {
    load: async () => {
      const model = JSON.parse(fs.readFileSync(modelPath, 'utf8'));
      const dir = path.dirname(modelPath);
      const specs = [];
      const buffers = [];
      for (const group of model.weightsManifest || []) {
        for (const rel of group.paths) buffers.push(fs.readFileSync(path.join(dir, rel)));
        specs.push(...group.weights);
      }
      const all = Buffer.concat(buffers);
      const weightData = all.buffer.slice(all.byteOffset, all.byteOffset + all.byteLength);
      return {
        modelTopology: model.modelTopology,
        format: model.format,
        generatedBy: model.generatedBy,
        convertedBy: model.convertedBy,
        signature: model.signature,
        userDefinedMetadata: model.userDefinedMetadata,
        weightSpecs: specs,
        weightData,
      };
    },
  };
}

async function main() {
  const request = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const tf = loadTf();
  await tf.setBackend('cpu');
  await tf.ready();
  const model = await tf.loadGraphModel(fileHandler(request.model));
  const feeds = {};
  for (const [name, spec] of Object.entries(request.inputs)) {
    const raw = fs.readFileSync(spec.file);
    const values = new Float32Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.byteLength));
    feeds[name] = tf.tensor(values, spec.shape, 'float32');
  }
  let results = model.execute(feeds, request.outputs);
  if (!Array.isArray(results)) results = [results];
  const written = [];
  for (let i = 0; i < results.length; i += 1) {
    const data = await results[i].data();
    const file = path.join(request.out_dir, `out${i}.bin`);
    fs.writeFileSync(file, Buffer.from(new Float32Array(data).buffer));
    written.push({ name: request.outputs[i], shape: results[i].shape, file });
  }
  fs.writeFileSync(path.join(request.out_dir, 'result.json'),
    JSON.stringify({ outputs: written, backend: tf.getBackend(), version: tf.version.tfjs }));
}

main().catch((err) => {
  process.stderr.write(`${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});
