// eventflow on ECS Fargate behind an ALB. Each task runs the service and an
// ADOT collector beside it: the collector scrapes the admin port into AMP,
// forwards traces to X-Ray, and writes the scaling metrics to CloudWatch.
'use strict';

const { Aws, Duration, Stack } = require('aws-cdk-lib');
const cloudwatch = require('aws-cdk-lib/aws-cloudwatch');
const ec2 = require('aws-cdk-lib/aws-ec2');
const ecs = require('aws-cdk-lib/aws-ecs');
const elbv2 = require('aws-cdk-lib/aws-elasticloadbalancingv2');
const iam = require('aws-cdk-lib/aws-iam');
const secretsmanager = require('aws-cdk-lib/aws-secretsmanager');
const appscaling = require('aws-cdk-lib/aws-applicationautoscaling');
const { Construct } = require('constructs');
const { nag } = require('./suppress');

const API_PORT = 8080;
const ADMIN_PORT = 8081;
/** ADOT collector release (public ECR). */
const COLLECTOR_IMAGE = 'public.ecr.aws/aws-observability/aws-otel-collector:v0.47.0';
/** CloudWatch namespace of the scaling metrics the collector writes. */
const METRICS_NAMESPACE = 'Eventflow';

class Service extends Construct {
  /**
   * @param {Construct} scope
   * @param {string} id
   * @param {{vpc: ec2.IVpc, image: string, natsUrl: string, streams: {idsMaxBytes: string, backlogMaxBytes: string, historyMaxBytes: string},
   *          observability: import('./observability').Observability,
   *          loadBalancer: elbv2.ApplicationLoadBalancer, listener: elbv2.ApplicationListener}} props
   */
  constructor(scope, id, props) {
    super(scope, id);
    const { vpc, observability } = props;

    const cluster = new ecs.Cluster(this, 'Cluster', {
      vpc,
      containerInsightsV2: ecs.ContainerInsights.ENHANCED,
    });

    /**
     * The bearer tokens, comma-separated (auth.tokens). Tasks read it when
     * they start: after editing it, `aws ecs update-service --force-new-deployment`.
     */
    this.tokens = new secretsmanager.Secret(this, 'Tokens', {
      description: 'eventflow bearer tokens, comma-separated (auth.tokens)',
      encryptionKey: observability.key,
      generateSecretString: { passwordLength: 48, excludePunctuation: true, includeSpace: false },
    });
    nag(this.tokens, [{
      id: 'AwsSolutions::AwsSolutions-SMG4',
      reason: 'client tokens are handed to producers out of band: rotation is a planned change (add the new token, move clients, remove the old), not a Lambda on a timer',
    }]);

    const task = new ecs.FargateTaskDefinition(this, 'Task', {
      cpu: 1024,
      memoryLimitMiB: 2048,
      runtimePlatform: {
        cpuArchitecture: ecs.CpuArchitecture.ARM64,
        operatingSystemFamily: ecs.OperatingSystemFamily.LINUX,
      },
    });
    const service = task.addContainer('eventflow', {
      image: ecs.ContainerImage.fromRegistry(props.image),
      essential: true,
      readonlyRootFilesystem: true,
      user: '65532:65532',
      memoryReservationMiB: 1024,
      portMappings: [
        { name: 'http', containerPort: API_PORT },
        { name: 'admin', containerPort: ADMIN_PORT },
      ],
      environment: {
        EVENTFLOW__SERVER__ADDR: `0.0.0.0:${API_PORT}`,
        EVENTFLOW__SERVER__ADMIN_ADDR: `0.0.0.0:${ADMIN_PORT}`,
        // ECS deregisters a task from the target group and waits out the
        // deregistration delay before it sends SIGTERM: no delay is needed
        // here, and the drain has the whole grace.
        EVENTFLOW__SERVER__SHUTDOWN_DELAY: '0s',
        EVENTFLOW__SERVER__SHUTDOWN_GRACE: '30s',
        // The ALB's addresses: X-Forwarded-For names the client for the
        // per-client rate limit.
        EVENTFLOW__SERVER__TRUSTED_PROXIES: vpc.vpcCidrBlock,
        // Longer than the ALB's 60 s idle timeout, so that the ALB, not the
        // task, closes an idle connection (else a request can meet a close: 502).
        EVENTFLOW__SERVER__IDLE_TIMEOUT: '75s',
        EVENTFLOW__SERVER__RATE_LIMIT_PER_SECOND: '2000',
        EVENTFLOW__SERVER__RATE_LIMIT_BURST: '4000',
        EVENTFLOW__SERVER__MAX_INFLIGHT_BODY_BYTES: String(256 * 1024 * 1024),
        EVENTFLOW__PIPELINE__QUEUE_MAX_BYTES: String(256 * 1024 * 1024),
        EVENTFLOW__BACKEND__KIND: 'nats',
        EVENTFLOW__BACKEND__NATS_URL: props.natsUrl,
        EVENTFLOW__BACKEND__NATS__REPLICAS: '3',
        // The stream limits of the scale tier (lib/eventflow-stack.js): 24 h
        // of ids, 30 minutes of backlog, 1 h of published events.
        EVENTFLOW__BACKEND__NATS__IDEMPOTENCY_WINDOW: '24h',
        EVENTFLOW__BACKEND__NATS__IDEMPOTENCY_MAX_BYTES: props.streams.idsMaxBytes,
        EVENTFLOW__BACKEND__NATS__BACKLOG_MAX_BYTES: props.streams.backlogMaxBytes,
        EVENTFLOW__BACKEND__NATS__HISTORY_MAX_BYTES: props.streams.historyMaxBytes,
        EVENTFLOW__BACKEND__NATS__HISTORY_MAX_AGE: '1h',
        // No stdout sink: the published stream is the output (SSE, NATS
        // consumers), and a line per event in CloudWatch Logs would cost
        // more than the rest of the stack (docs/aws.md).
        EVENTFLOW__PUBLISH__SINKS: '',
        EVENTFLOW__TELEMETRY__OTLP_ENDPOINT: 'http://127.0.0.1:4317',
        // 1 % of requests traced: measured at 1.9 % of throughput (docs/performance.md, section 5).
        EVENTFLOW__TELEMETRY__SAMPLE_RATIO: '0.01',
      },
      secrets: { EVENTFLOW__AUTH__TOKENS: ecs.Secret.fromSecretsManager(this.tokens) },
      healthCheck: {
        command: ['CMD', '/usr/local/bin/eventflow', 'healthcheck'],
        interval: Duration.seconds(10),
        timeout: Duration.seconds(3),
        retries: 3,
        startPeriod: Duration.seconds(10),
      },
      // SIGKILL only after the drain's 30 s (Fargate allows up to 120 s).
      stopTimeout: Duration.seconds(45),
      logging: ecs.LogDrivers.awsLogs({ logGroup: observability.serviceLogs, streamPrefix: 'eventflow' }),
    });

    // The collector: ingest never waits for it (not essential), so a
    // telemetry outage costs metrics and traces, never events.
    const collector = task.addContainer('collector', {
      image: ecs.ContainerImage.fromRegistry(COLLECTOR_IMAGE),
      essential: false,
      readonlyRootFilesystem: true,
      user: '10001:10001',
      memoryReservationMiB: 256,
      environment: { AOT_CONFIG_CONTENT: Stack.of(this).toJsonString(collectorConfig(observability)) },
      logging: ecs.LogDrivers.awsLogs({ logGroup: observability.collectorLogs, streamPrefix: 'collector' }),
    });
    service.addContainerDependencies({ container: collector, condition: ecs.ContainerDependencyCondition.START });

    // Least privilege: remote-write to this workspace, traces to X-Ray, EMF
    // records to this log group. Nothing else.
    task.addToTaskRolePolicy(new iam.PolicyStatement({
      actions: ['aps:RemoteWrite'],
      resources: [observability.workspace.attrArn],
    }));
    task.addToTaskRolePolicy(new iam.PolicyStatement({
      actions: ['xray:PutTraceSegments', 'xray:PutTelemetryRecords', 'xray:GetSamplingRules', 'xray:GetSamplingTargets'],
      resources: ['*'],
    }));
    observability.metricLogs.grantWrite(task.taskRole);
    nag(task, [
      {
        id: 'AwsSolutions::AwsSolutions-IAM5[Resource::*]',
        reason: 'X-Ray\'s trace APIs take no resource ARN: "*" is their only form (the other statements name this stack\'s workspace and log group)',
      },
      {
        id: 'AwsSolutions::AwsSolutions-ECS2',
        reason: 'the environment holds configuration only, reviewed with the code; the one secret (the tokens) comes from Secrets Manager',
      },
    ]);

    /** The security group of the tasks. */
    this.securityGroup = new ec2.SecurityGroup(this, 'SecurityGroup', {
      vpc,
      description: 'eventflow tasks: the API and admin ports from the load balancer',
      allowAllOutbound: true,
    });
    /** The ECS service. */
    this.service = new ecs.FargateService(this, 'Service', {
      cluster,
      taskDefinition: task,
      // No desiredCount: the autoscaler owns the count (3 to 12), and a
      // deployment must not reset it.
      minHealthyPercent: 100,
      maxHealthyPercent: 200,
      circuitBreaker: { enable: true, rollback: true },
      securityGroups: [this.securityGroup],
      vpcSubnets: { subnetType: ec2.SubnetType.PRIVATE_WITH_EGRESS },
      assignPublicIp: false,
      // Spread over the AZs first (Fargate's default placement).
      availabilityZoneRebalancing: ecs.AvailabilityZoneRebalancing.ENABLED,
    });

    props.listener.addTargets('Eventflow', {
      port: API_PORT,
      protocol: elbv2.ApplicationProtocol.HTTP,
      targets: [this.service.loadBalancerTarget({ containerName: 'eventflow', containerPort: API_PORT })],
      // The ALB waits this long for open requests (and SSE streams, whose
      // clients resume on another task with Last-Event-ID) before ECS sends
      // SIGTERM; the drain then has its own 30 s.
      deregistrationDelay: Duration.seconds(30),
      healthCheck: {
        path: '/readyz',
        port: String(ADMIN_PORT),
        protocol: elbv2.Protocol.HTTP,
        healthyHttpCodes: '200',
        interval: Duration.seconds(10),
        timeout: Duration.seconds(5),
        healthyThresholdCount: 2,
        unhealthyThresholdCount: 2,
      },
    });
    this.securityGroup.connections.allowFrom(props.loadBalancer, ec2.Port.tcp(ADMIN_PORT), 'health checks on the admin port');

    // Scaling: out on the JetStream backlog (a custom metric, the bytes of
    // accepted, unpublished events, written by the collectors) in steps; in and
    // out on CPU, which is the floor. Every task reports the same backlog:
    // Maximum is the figure. The backlog policy only adds tasks: a scale-in
    // step would fire whenever the backlog is small and fight CPU's policy.
    const scaling = this.service.autoScaleTaskCount({ minCapacity: 3, maxCapacity: 12 });
    scaling.scaleOnCpuUtilization('Cpu', {
      targetUtilizationPercent: 70,
      scaleInCooldown: Duration.minutes(5),
      scaleOutCooldown: Duration.minutes(1),
    });
    /** The backlog metric the service scales on. */
    this.backlog = new cloudwatch.Metric({
      namespace: METRICS_NAMESPACE,
      metricName: 'eventflow_nats_backlog_bytes',
      dimensionsMap: { Service: 'eventflow' },
      statistic: 'Maximum',
      period: Duration.minutes(1),
    });
    scaling.scaleOnMetric('Backlog', {
      metric: this.backlog,
      adjustmentType: appscaling.AdjustmentType.CHANGE_IN_CAPACITY,
      // About 50,000 and 200,000 events waiting (some 330 bytes each).
      scalingSteps: [
        { lower: 16 * 1024 * 1024, change: +1 },
        { lower: 64 * 1024 * 1024, change: +3 },
      ],
      cooldown: Duration.minutes(2),
      evaluationPeriods: 3,
    });
  }
}

/** The ADOT collector's pipelines, as the object AOT_CONFIG_CONTENT carries. */
function collectorConfig(observability) {
  return {
    extensions: { sigv4auth: { region: Aws.REGION, service: 'aps' }, health_check: {} },
    receivers: {
      otlp: { protocols: { grpc: { endpoint: '127.0.0.1:4317' } } },
      prometheus: {
        config: {
          scrape_configs: [{
            job_name: 'eventflow',
            scrape_interval: '15s',
            static_configs: [{ targets: [`127.0.0.1:${ADMIN_PORT}`] }],
            // A data-point label for the CloudWatch dimension: the receiver
            // keeps job and instance as resource attributes only, which
            // awsemf does not turn into dimensions.
            metric_relabel_configs: [{ action: 'replace', target_label: 'Service', replacement: 'eventflow' }],
          }],
        },
      },
    },
    processors: {
      batch: {},
      resourcedetection: { detectors: ['env', 'ecs'] },
      // Which task a series comes from (the alert rules group by instance):
      // every task scrapes 127.0.0.1, so the instance becomes the task's ARN.
      'resource/instance': {
        attributes: [{ key: 'service.instance.id', from_attribute: 'aws.ecs.task.arn', action: 'upsert' }],
      },
    },
    exporters: {
      prometheusremotewrite: {
        endpoint: observability.remoteWriteUrl,
        auth: { authenticator: 'sigv4auth' },
        resource_to_telemetry_conversion: { enabled: true },
      },
      awsxray: { region: Aws.REGION },
      awsemf: {
        region: Aws.REGION,
        namespace: METRICS_NAMESPACE,
        log_group_name: observability.metricLogs.logGroupName,
        dimension_rollup_option: 'NoDimensionRollup',
        metric_declarations: [{
          dimensions: [['Service']],
          metric_name_selectors: ['^eventflow_nats_backlog_bytes$', '^eventflow_nats_consumer_pending$', '^eventflow_queue_depth$', '^eventflow_queue_capacity$'],
        }],
      },
    },
    service: {
      extensions: ['sigv4auth', 'health_check'],
      pipelines: {
        metrics: {
          receivers: ['prometheus'],
          processors: ['resourcedetection', 'resource/instance', 'batch'],
          exporters: ['prometheusremotewrite', 'awsemf'],
        },
        traces: { receivers: ['otlp'], processors: ['resourcedetection', 'batch'], exporters: ['awsxray'] },
      },
    },
  };
}

module.exports = { Service, API_PORT, ADMIN_PORT };
